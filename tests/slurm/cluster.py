"""A real Slurm cluster on one machine, for tests: munged, slurmctld and one slurmd per node, each
daemon in a network namespace of its own with its own address (and its own host name, which
resolves to a loopback address on that node, as Debian sets up /etc/hosts).

Needs root, `ip netns` and `unshare`; Debian's slurm-wlm and munge are installed with apt when
missing. Every daemon is started here and stopped by its PID; so is anything left inside the
namespaces (slurmstepd, job processes), and the namespaces are removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")
SUBNET = "10.77.0"
CONTROLLER = "ctl"


def unavailable() -> Optional[str]:
    """Why a cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and Slurm daemons); .ci/run runs it as root"
    for tool in ("ip", "nsenter", "unshare", "getent", "pkill"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not all(shutil.which(b) for b in BINARIES) and shutil.which("apt-get") is None:
        return "slurm-wlm and munge are not installed and there is no apt-get to install them"
    probe = f"plci-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def install() -> Optional[str]:
    """Debian's slurm-wlm and munge, when missing (seconds on a Debian machine); returns why they
    could not be installed (apt's last lines), None when they are there."""
    if all(shutil.which(b) for b in BINARIES):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        return "apt-get could not install slurm-wlm and munge: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    return None


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll until ``condition()`` is truthy (returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


class Cluster:
    """A controller and slurmd nodes under ``workdir``: partition ``cpu`` (the default) of
    ``cpu_nodes`` without GPUs, partition ``gpu`` of ``gpu_nodes`` with ``gpus_per_node`` GPUs each
    (a GPU gres whose device files are empty files: Slurm counts, allocates and reports them;
    nothing can compute on them). Every node declares ``cpus`` CPUs."""

    def __init__(self, workdir: Path, cpu_nodes: tuple[str, ...] = ("n1", "n2"),
                 gpu_nodes: tuple[str, ...] = (), gpus_per_node: int = 2, cpus: int = 8,
                 kill_wait: int = 30, requeue_delay: int = 5):
        self.workdir, self.cpus = Path(workdir), cpus
        self.cpu_nodes, self.gpu_nodes, self.gpus_per_node = cpu_nodes, gpu_nodes, gpus_per_node
        self.nodes = cpu_nodes + gpu_nodes
        self.kill_wait, self.requeue_delay = kill_wait, requeue_delay
        self.tag = f"plci{os.getpid()}"
        self.addresses = {CONTROLLER: f"{SUBNET}.1", **{n: f"{SUBNET}.{11 + i}" for i, n in enumerate(self.nodes)}}
        self.conf = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.sock"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._namespaces: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    # -- start / stop -----------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._network()
            self._munge()
            self._write_conf()
            self._daemon("slurmctld", CONTROLLER, ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                (self.workdir / node).mkdir(exist_ok=True)
                self._daemon(f"slurmd {node}", node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            wait_for(self._all_idle, 60, "every node to be idle", interval=0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Everything this cluster started, by PID; then its namespaces. Safe to call twice."""
        if any(p.poll() is None for _, p in self._daemons):
            self.run(["scancel", "--full", "--signal=KILL", "--state=RUNNING"], check=False)
        for _, proc in reversed(self._daemons):
            _end(proc)
        for ns in self._namespaces:  # what the daemons left: slurmstepd and job processes
            self._kill_pids(self._pids_in(ns))
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._daemons, self._namespaces = [], []

    def _network(self) -> None:
        """The controller's namespace holds a bridge; each node is a veth into it."""
        ctl = self.ns(CONTROLLER)
        self._add_namespace(CONTROLLER)
        _ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        _ip("-n", ctl, "addr", "add", f"{self.addresses[CONTROLLER]}/24", "dev", "br0")
        _ip("-n", ctl, "link", "set", "br0", "up")
        _ip("-n", ctl, "link", "set", "lo", "up")
        for node in self.nodes:
            ns = self._add_namespace(node)
            _ip("-n", ctl, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", ctl, "link", "set", f"v{node}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _add_namespace(self, host: str) -> str:
        ns = self.ns(host)
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        # Each host sees its own name at a loopback address (Debian's default) and the others at theirs.
        others = [f"{addr} {h}" for h, addr in self.addresses.items() if h != host]
        self._hosts_file(host).write_text("\n".join(["127.0.0.1 localhost", f"127.0.1.1 {host}", *others]) + "\n")
        return ns

    def _hosts_file(self, host: str) -> Path:
        return self.workdir / f"hosts.{host}"

    def on(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` as run on ``host``: its network namespace, its name and its /etc/hosts (bound in a
        mount namespace of its own; the rest of the file system, /sys/fs/cgroup included, is shared)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(host)}", "unshare", "--mount", "--uts", "sh", "-c",
                f'mount --bind {self._hosts_file(host)} /etc/hosts && hostname {host} && exec "$@"', "sh", *argv]

    def _munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        key = d / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        proc = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._daemons.append(("munged", proc))
        wait_for(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        w = self.workdir
        (w / "ctld").mkdir(exist_ok=True)
        lines = [f"NodeName={n} NodeAddr={self.addresses[n]} CPUs={self.cpus} RealMemory=2000"
                 + (f" Gres=gpu:{self.gpus_per_node}" if n in self.gpu_nodes else "") + " State=UNKNOWN"
                 for n in self.nodes]
        lines.append(f"PartitionName=cpu Nodes={','.join(self.cpu_nodes)} Default=YES MaxTime=INFINITE State=UP")
        gres_conf = ""
        if self.gpu_nodes:
            lines.append(f"PartitionName=gpu Nodes={','.join(self.gpu_nodes)} MaxTime=INFINITE State=UP")
            (w / "dev").mkdir(exist_ok=True)
            for i in range(self.gpus_per_node):
                (w / "dev" / f"nvidia{i}").touch()
            gres_conf = (f"NodeName={','.join(self.gpu_nodes)} Name=gpu "
                         f"File={w}/dev/nvidia[0-{self.gpus_per_node - 1}]\n")
        (w / "gres.conf").write_text(gres_conf)
        nodes = "\n".join(lines)
        self.conf.write_text(f"""\
ClusterName=prolongci
SlurmctldHost={CONTROLLER}({self.addresses[CONTROLLER]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it can start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire={self.requeue_delay}
StateSaveLocation={w}/ctld
SlurmdSpoolDir={w}/%n
SlurmctldPidFile={w}/ctld/slurmctld.pid
SlurmdPidFile={w}/%n/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Try pending jobs every 2 s (default 60): a requeued job starts once cred_expire has passed.
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait={self.kill_wait}
MinJobAge=3600
GresTypes=gpu
{nodes}
""")

    def _daemon(self, name: str, host: str, argv: list[str]) -> None:
        cmd = self.on(host, argv)  # exec all the way: the daemon's PID is that of Popen
        log = open(self.workdir / f"{name.replace(' ', '-')}.stdout", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._daemons.append((name, proc))

    def _all_idle(self) -> bool:
        self._check_daemons()
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _check_daemons(self) -> None:
        dead = [f"{name} (exit {p.returncode})" for name, p in self._daemons if p.poll() is not None]
        if dead:
            raise RuntimeError(f"Slurm daemons ended: {dead}; see the logs in {self.workdir}")

    @staticmethod
    def _pids_in(ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    @staticmethod
    def _kill_pids(pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- using it ---------------------------------------------------------------------------

    def run(self, argv: list[str], check: bool = True, cwd=None, env: Optional[dict] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) on the controller's host; ``env`` adds to the
        environment (a value of None removes the variable)."""
        merged = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        out = subprocess.run(self.on(CONTROLLER, argv), cwd=cwd, env=merged, capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, args: list[str], cwd: Path, env: Optional[dict] = None) -> str:
        return self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def signal(self, job_id: str, sig: str, batch: bool = False) -> None:
        self.run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), job_id])

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", job_id])

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll the job until its state is one of ``states``; returns its record."""
        def reached():
            self._check_daemons()
            record = self.job(job_id)
            return record if record.get("JobState") in states else None

        return wait_for(reached, timeout, f"job {job_id} to be {sorted(states)}", interval=1.0)

    def pids_of_job(self, job_id: str, node: str, command: str) -> list[int]:
        """PIDs on ``node`` whose environment holds this job id and whose command line has ``command``."""
        found = []
        for pid in self._pids_in(self.ns(node)):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job_id}".encode() in environ and command in cmdline:
                found.append(pid)
        return found

    def log_tail(self) -> str:
        """The daemons' last lines, for a failure message."""
        parts = []
        for f in sorted(self.workdir.glob("slurm*.log")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _end(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
