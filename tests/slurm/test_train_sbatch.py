"""examples/slurm/train.sbatch, unmodified, on a real Slurm cluster (tests/slurm/cluster.py: a
controller and four slurmd, each node in its own network namespace and with its own address; each
host name resolves to a loopback address on its own node, as Debian's /etc/hosts has it).

Every job is submitted from a fresh copy of the repository (no ``logs/``), the way a new user
submits, with CPU overrides only: on the ``cpu`` partition (n1, n2: no GPU gres)
``--gpus-per-node=0 --cpus-per-task=1`` and ``NPROC_PER_NODE=1``, plus ``--exclusive=user`` so
that jobs share nodes as two jobs of one user do; on the ``gpu`` partition (g1, g2: two GPUs each,
without devices) the script's own ``--exclusive`` with ``--gpus-per-node=1 --cpus-per-task=1``.
The trainers run the tiny CPU recipe. The jobs run at the same time:

- P (n1+n2, 40 steps): SIGUSR1 to the batch script (what ``--signal=B:USR1@lead`` sends) at step 4
  or later -> every rank saves -> requeue -> resume; SIGUSR1 again during its final save -> not
  requeued (training is finished);
- B (g1+g2, 40 steps, uninterrupted): P's reference; its batch step sees both GPUs of its node,
  each node's step the one requested;
- T (n1, ``--time=2 --signal=B:USR1@30``): Slurm's own signal -> save -> requeue -> resume; then
  ``scancel``;
- O (n1+n2, sharing n1 with T and P): trains on while T and P are pre-empted; then one of its
  ranks is killed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.slurm.cluster import Cluster, wait_for

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "examples/slurm/train.sbatch"
RECIPE = "examples/tiny_cpu.yaml"
CPU = ["--partition=cpu", "--gpus-per-node=0", "--cpus-per-task=1", "--exclusive=user"]
GPU = ["--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=1"]
LEAD = 30  # with --time=2 Slurm signals 60-90 s after the start (it checks every 30 s)
SHORT, LONG = 40, 2000  # steps of P and B; of T and O (cancelled or killed long before)
SLURM_USR1 = r"^\[slurm\] .* SIGUSR1 \(pre-emption\)"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY"}


@dataclass
class Job:
    name: str
    id: str
    log: Path
    save_dir: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def losses(self) -> dict[int, str]:
        """The loss printed for each step, over every start of the job."""
        return {int(m[1]): m[2] for m in re.finditer(r"^step +(\d+)/\d+ \| loss (\S+)", self.text(), re.M)}

    def last_step(self) -> int:
        return max(self.losses(), default=0)


@dataclass
class Flow:
    """What one sequence of actions observed; ``error`` is the failure that cut it short."""
    obs: dict = field(default_factory=dict)
    error: Optional[BaseException] = None

    def need(self, *keys: str) -> list:
        missing = [k for k in keys if k not in self.obs]
        if missing:
            pytest.fail(f"not observed: {missing}; the run stopped with: {self.error!r}")
        return [self.obs[k] for k in keys]


class Scenario:
    def __init__(self, cluster: Cluster, src: Path, out: Path):
        self.cluster, self.src, self.out = cluster, src, out
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def submit(self, name: str, options: list[str], steps: int, *overrides: str, env: dict) -> Job:
        save_dir = self.out / name
        job_env = {"OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore",
                   "NPROC_PER_NODE": None, **env}
        job_id = self.cluster.sbatch(
            [*options, SCRIPT, RECIPE, f"train.steps={steps}", "train.seq_length=64", "logging.interval=1",
             f"checkpoint.save_dir={save_dir}", *overrides], cwd=self.src, env=job_env)
        return Job(name, job_id, self.src / f"prolong-{job_id}.out", save_dir)

    def wait_log(self, job: Job, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first match of ``pattern`` in the job's output from offset ``start``; fails at once
        if the job ends without it."""
        rx = re.compile(pattern, re.M)

        def found():
            m = rx.search(job.text(), start)
            if m is None and self.cluster.job(job.id).get("JobState") in FINAL:
                m = rx.search(job.text(), start)  # printed just before the end
                if m is None:
                    raise AssertionError(f"job {job.name} ended before printing /{pattern}/\n{self._tail(job)}")
            return m

        try:
            return wait_for(found, timeout, f"/{pattern}/ in job {job.name}'s output", interval=1.0)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self._tail(job)}\n{self.cluster.log_tail()}") from None

    def _tail(self, job: Job) -> str:
        return f"--- {job.log} (last lines):\n" + "\n".join(job.text().splitlines()[-25:])

    def stays(self, job: Job, state: str, seconds: float = 5.0) -> dict:
        """The job's record, after checking it keeps ``state`` for ``seconds`` (a job requeued by
        its own script would leave it)."""
        deadline = time.monotonic() + seconds
        while True:
            record = self.cluster.job(job.id)
            assert record["JobState"] == state, f"job {job.name} went from {state} to {record['JobState']}"
            if time.monotonic() > deadline:
                return record
            time.sleep(1.0)


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone has them (tracked and not ignored): no logs/, no runs."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def trainer_pids(cluster: Cluster, job: Job, node: str) -> list[int]:
    """The job's trainer processes on ``node``: children of its torchrun agent (not its
    checkpoint writers, which have the trainer's command line too)."""
    def parent_command(pid: int) -> bytes:
        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        return Path(f"/proc/{ppid}/cmdline").read_bytes()

    return [pid for pid in cluster.pids_of_job(job.id, node, "pretrain_prolong.py")
            if b"torch.distributed.run" in parent_command(pid)]


def run_preemption(s: Scenario, p: Job, b: Job, flow: Flow) -> None:
    o = flow.obs
    s.wait_log(p, r"^step +4/", 420)
    s.cluster.signal(p.id, "USR1", batch=True)
    o["p_saved_at"] = int(s.wait_log(p, r"pre-emption signal: stopped after step (\d+)", 180)[1])
    s.wait_log(p, r"^\[slurm\] trainer: preempted .*requeueing", 60)
    o["p_requeued_at_s"] = s.elapsed()
    s.wait_log(p, rf"^resumed from {re.escape(str(p.save_dir))} at step {o['p_saved_at']} ", 420)
    o["p_resumed_at_s"] = s.elapsed()
    s.wait_log(p, rf"^step +{SHORT}/{SHORT} ", 420)
    # The final save takes >= 8 s here (PROLONG_FAULTS): the signal arrives after the last step.
    o["p_late_signal"] = s.cluster.run(["scancel", "--signal=USR1", "--batch", p.id], check=False).returncode
    o["p_end"] = s.cluster.wait_state(p.id, FINAL, 180)
    o["p_done_s"] = s.elapsed()
    o["b_end"] = s.cluster.wait_state(b.id, FINAL, 420)
    o["b_done_s"] = s.elapsed()


def run_time_limit(s: Scenario, t: Job, flow: Flow) -> None:
    o = flow.obs
    signalled = s.wait_log(t, SLURM_USR1, 420)  # sent by Slurm, LEAD s before the time limit
    o["t_signal_at_s"] = s.elapsed()
    o["t_saved_at"] = int(s.wait_log(t, r"pre-emption signal: stopped after step (\d+)", 180, signalled.end())[1])
    s.wait_log(t, r"^\[slurm\] trainer: preempted .*requeueing", 60)
    resumed = s.wait_log(t, rf"^resumed from {re.escape(str(t.save_dir))} at step {o['t_saved_at']} ", 420)
    s.wait_log(t, rf"^step +{o['t_saved_at'] + 1}/{LONG} ", 180, resumed.end())
    o["t_resumed_at_s"] = s.elapsed()
    o["t_running"] = s.cluster.job(t.id)

    s.cluster.cancel(t.id)
    o["t_cancelled"] = s.cluster.wait_state(t.id, FINAL, 120)
    o["t_after_cancel"] = s.stays(t, o["t_cancelled"]["JobState"])
    stopped = re.search(r"pre-emption signal: stopped after step (\d+)", t.text()[resumed.end():])
    o["t_saved_on_cancel"] = int(stopped[1]) if stopped else None
    o["t_cancelled_at_s"] = s.elapsed()


def run_other(s: Scenario, t: Job, other: Job, flow: Flow) -> None:
    """O shares n1 with T: it trains on through T's pre-emption; then one of its ranks is killed."""
    o = flow.obs
    s.wait_log(t, SLURM_USR1, 420)
    o["o_step_at_t_signal"] = other.last_step()
    s.wait_log(t, r"^\[slurm\] trainer: preempted .*requeueing", 240)
    at = other.last_step()
    wait_for(lambda: other.last_step() >= at + 3, 120, "job O to train on after T's requeue", interval=1.0)
    o["o_step_after_t_requeue"] = other.last_step()
    o["o_running"] = s.cluster.job(other.id)

    s.wait_log(other, r"^saved checkpoint \S+/iter_\d+", 180)
    victims = trainer_pids(s.cluster, other, "n2")
    assert len(victims) == 1, f"expected one trainer of job {other.name} on n2, found {victims}"
    killed = time.monotonic()
    os.kill(victims[0], signal.SIGKILL)
    o["o_end"] = s.cluster.wait_state(other.id, FINAL, 180)
    o["o_failed_after_s"] = round(time.monotonic() - killed, 1)
    o["o_killed_at_s"] = s.elapsed()


@dataclass
class Runs:
    scenario: Scenario
    jobs: dict[str, Job]
    preemption: Flow
    time_limit: Flow
    other: Flow
    had_logs_dir: bool
    refused: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Runs:
    src = fresh_copy(tmp_path_factory.mktemp("clone"))
    s = Scenario(cluster, src, tmp_path_factory.mktemp("checkpoints"))
    had_logs_dir = (src / "logs").exists()
    cpu_env = {"NPROC_PER_NODE": "1"}
    jobs = {
        "T": s.submit("T", CPU + ["--nodes=1", "--nodelist=n1", "--time=2", f"--signal=B:USR1@{LEAD}"], LONG,
                      "checkpoint.save_interval=0", env=cpu_env),
        "O": s.submit("O", CPU + ["--nodes=2"], LONG, "checkpoint.save_interval=25", env=cpu_env),
        "P": s.submit("P", CPU + ["--nodes=2"], SHORT, "checkpoint.save_interval=0",
                      env={**cpu_env, "PROLONG_FAULTS": f"slow_save@{SHORT}=8"}),
        "B": s.submit("B", GPU + ["--nodes=2"], SHORT, "checkpoint.save_interval=0", env={}),
    }
    # The script as it stands (8 GPUs per node) on the CPU partition: refused at submission.
    refused = cluster.run(["sbatch", "--partition=cpu", "--nodes=2", "--cpus-per-task=1", SCRIPT, RECIPE],
                          cwd=src, check=False)
    flows = {"preemption": Flow(), "time_limit": Flow(), "other": Flow()}

    def guarded(fn: Callable, flow: Flow, *args) -> None:
        try:
            fn(s, *args, flow)
        except BaseException as e:  # kept for the tests that need what it did not observe
            flow.error = e

    with ThreadPoolExecutor(len(flows)) as pool:
        pool.submit(guarded, run_preemption, flows["preemption"], jobs["P"], jobs["B"])
        pool.submit(guarded, run_time_limit, flows["time_limit"], jobs["T"])
        pool.submit(guarded, run_other, flows["other"], jobs["T"], jobs["O"])
    print(f"\n[slurm] scenario done in {s.elapsed()} s: "  # timings and steps, for the record
          + "; ".join(f"{k}={v}" for f in flows.values() for k, v in f.obs.items() if not isinstance(v, dict)))
    return Runs(s, jobs, flows["preemption"], flows["time_limit"], flows["other"], had_logs_dir, refused)


def _order(text: str, *patterns: str) -> list[int]:
    """Offsets of the first match of each pattern, each searched after the previous one."""
    offsets, at = [], 0
    for pattern in patterns:
        m = re.compile(pattern, re.M).search(text, at)
        assert m, f"/{pattern}/ not found after offset {at}"
        offsets.append(m.start())
        at = m.end()
    return offsets


def test_first_sbatch_without_logs_folder_writes_where_the_user_looks(runs):
    t = runs.jobs["T"]
    assert not runs.had_logs_dir, "the fresh copy had a logs/ folder"
    assert t.log.is_file(), f"no {t.log.name} in the submit directory: {sorted(os.listdir(t.log.parent))}"
    _order(t.text(), rf"^\[slurm\] .* job {t.id} start 0 on n1", r"^step +1/")


def test_launch_on_two_cpu_nodes_with_the_documented_overrides(runs):
    p = runs.jobs["P"]
    runs.preemption.need("p_saved_at")
    assert runs.refused.returncode != 0 and "node configuration is not available" in runs.refused.stderr, \
        runs.refused.stderr
    text = p.text()
    for node in ("n1", "n2"):  # one torchrun per node; gloo on the interface towards the other node
        assert re.search(rf"^\[slurm\] {node}: 1 processes .*NPROC_PER_NODE: 1\)", text, re.M), node
        assert re.search(rf"^\[slurm\] {node}: {node} resolves to a loopback address; GLOO_SOCKET_IFNAME=eth0", text, re.M)
    assert re.search(r"^model .* DP 2 \|", text, re.M)


def test_gpu_count_is_taken_inside_the_step(runs):
    b = runs.jobs["B"]
    (end,) = runs.preemption.need("b_end")
    text = b.text()
    assert "(GPUs of this batch step: 2;" in text  # --exclusive: the batch step sees the whole node
    for node in ("g1", "g2"):
        assert re.search(rf"^\[slurm\] {node}: 1 processes \(this step's GPUs: 1; NPROC_PER_NODE: unset\)", text, re.M)
    assert re.search(r"^model .* DP 2 \|", text, re.M)
    assert end["JobState"] == "COMPLETED", end


def test_usr1_preemption_saves_requeues_and_resumes_like_an_uninterrupted_run(runs, tmp_path):
    p, b = runs.jobs["P"], runs.jobs["B"]
    saved_at, end, b_end = runs.preemption.need("p_saved_at", "p_end", "b_end")
    assert 4 <= saved_at < SHORT
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", end
    assert b_end["JobState"] == "COMPLETED" and b_end["Restarts"] == "0", b_end
    # One output file across the requeue (--open-mode=append): the pre-empted start's lines stay.
    _order(p.text(), rf"job {p.id} start 0", r"SIGUSR1 \(pre-emption\)", rf"stopped after step {saved_at};",
           r"trainer: preempted .*requeueing", rf"job {p.id} start 1", rf"resumed from .* at step {saved_at} ",
           rf"^step +{saved_at + 1}/{SHORT} ")
    assert p.losses() == b.losses() and sorted(p.losses()) == list(range(1, SHORT + 1))
    _assert_same_tensors(p.save_dir / f"iter_{SHORT:07d}", b.save_dir / f"iter_{SHORT:07d}", tmp_path)


def test_a_signal_after_the_last_step_does_not_requeue(runs):
    p = runs.jobs["P"]
    late, end = runs.preemption.need("p_late_signal", "p_end")
    assert late == 0, "the signal after the last step did not reach the job"
    after = p.text().rindex(f"job {p.id} start 1")
    _order(p.text()[after:], rf"^step +{SHORT}/{SHORT} ", r"SIGUSR1 \(pre-emption\)",
           rf"^\[slurm\] trainer: finished {SHORT} {SHORT}; not requeued")
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", end


def test_time_limit_signal_requeues_and_resumes(runs):
    t = runs.jobs["T"]
    saved_at, running, signal_at = runs.time_limit.need("t_saved_at", "t_running", "t_signal_at_s")
    assert running["JobState"] == "RUNNING" and running["Restarts"] == "1", running
    _order(t.text(), rf"job {t.id} start 0", r"SIGUSR1 \(pre-emption\)", rf"stopped after step {saved_at};",
           r"requeueing", rf"job {t.id} start 1", rf"resumed from .* at step {saved_at} ")
    assert saved_at >= 1, f"the signal (at {signal_at} s) came before the first step"


def test_two_jobs_on_one_node_preempting_one_leaves_the_other_training(runs):
    t, other, p = runs.jobs["T"], runs.jobs["O"], runs.jobs["P"]
    before, after, running = runs.other.need("o_step_at_t_signal", "o_step_after_t_requeue", "o_running")
    (t_running,) = runs.time_limit.need("t_running")
    runs.preemption.need("p_saved_at")
    assert running["JobState"] == "RUNNING" and running["Restarts"] == "0", running
    assert (t_running["NodeList"], running["NodeList"]) == ("n1", "n[1-2]")  # and P on n[1-2] too
    assert after > before, f"job O did not train on while T was pre-empted ({before} -> {after})"
    text = other.text()
    assert "pre-emption signal" not in text and "SIGUSR1" not in text
    # P's own signal did not reach T either: T's first stop comes after T's own signal.
    _order(t.text(), r"SIGUSR1 \(pre-emption\)", r"pre-emption signal: stopped after step")


def test_scancel_cancels_and_does_not_requeue(runs):
    t = runs.jobs["T"]
    cancelled, held, saved = runs.time_limit.need("t_cancelled", "t_after_cancel", "t_saved_on_cancel")
    assert cancelled["JobState"] == "CANCELLED" and cancelled["Restarts"] == "1", cancelled
    assert held["JobState"] == "CANCELLED" and held["Restarts"] == "1", held
    assert re.search(r"SIGTERM \(scancel", t.text())
    from megatron_prolong.checkpoint_layout import latest_iteration

    assert saved is not None and latest_iteration(t.save_dir) == saved, "no checkpoint on the way out"


def test_a_killed_rank_fails_the_job_fast_and_latest_is_complete(runs):
    other = runs.jobs["O"]
    end, seconds = runs.other.need("o_end", "o_failed_after_s")
    assert end["JobState"] == "FAILED" and end["Restarts"] == "0", end
    assert seconds < 60, f"the job took {seconds} s to fail"
    from megatron_prolong.checkpoint_layout import iteration_dir, latest_iteration
    from megatron_prolong.training.checkpoint_integrity import verify

    latest = latest_iteration(other.save_dir)
    assert latest is not None and latest % 25 == 0
    report = verify(iteration_dir(other.save_dir, latest))
    assert report.ok and report.tensors > 0, report.problems


def _assert_same_tensors(a: Path, b: Path, tmp: Path) -> None:
    """Every stored tensor (weights, fp32 main weights, Adam moments) equal bit for bit."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    loaded = []
    for i, ckpt in enumerate((a, b)):
        dcp_to_torch_save(str(ckpt), str(tmp / f"{i}.pt"))
        loaded.append({k: v for k, v in torch.load(tmp / f"{i}.pt", weights_only=False).items() if torch.is_tensor(v)})
    assert loaded[0].keys() == loaded[1].keys() and len(loaded[0]) > 10
    different = [k for k in loaded[0] if not torch.equal(loaded[0][k], loaded[1][k])]
    assert not different, different
