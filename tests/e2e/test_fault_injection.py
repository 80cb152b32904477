"""Faults injected into real runs (torchrun, gloo, the tiny CPU recipe), and what survives them.

- SIGKILL of the whole job (the torchrun agent; its workers and their checkpoint writers go with
  it) while a checkpoint is being written: ``latest`` still names the previous complete save,
  and the relaunch resumes from it with the losses of the uninterrupted run;
- SIGTERM to every process of the job (a scheduler's cancel): the ranks still save and exit 0;
- the issue's diverging run (``optim.lr=1e6``): non-finite steps are skipped, the run stops after
  ``train.max_bad_steps`` naming the steps, and no checkpoint holds non-finite values;
- a rank that exits (or hangs) mid-step, on another "node" (two torchrun agents, so no agent
  tears the survivor down): the survivor fails with a clear error, at once when the peer's
  connection drops, after ``train.collective_timeout_minutes`` when the peer hangs;
- a damaged tensor file in the latest checkpoint: the relaunch fails naming the file, and
  ``tools/checkpoint_info.py --verify`` reports it.

Faults are placed with ``PROLONG_FAULTS`` (``megatron_prolong/training/faults.py``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.dist import free_port
from tests.tool_env import tool_env

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config", "examples/tiny_cpu.yaml", "train.seq_length=64"]
LOSS = re.compile(r"^step +(\d+)/\d+ \| loss (\S+)")


def _env(faults: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PROLONG_FAULTS", None)
    if faults:
        env["PROLONG_FAULTS"] = faults
    return tool_env(env)


def _torchrun(nproc: int, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
            *extra, "pretrain_prolong.py"]


class _Job:
    """A launched command whose output is collected by a thread (so the test can watch it)."""

    def __init__(self, cmd: list[str], env: dict):
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.seen: dict = {}
        """Every process of this job's tree seen so far (to clean up after the agent is gone)."""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, predicate, timeout: float) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the job ended (rc {self.proc.returncode}) first:\n{self.text[-4000:]}")
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s:\n{self.text[-4000:]}")
            time.sleep(0.2)

    def time_of(self, needle: str) -> float:
        return next(t for t, line in self.lines if needle in line)

    def losses(self) -> dict[int, str]:
        return {int(m.group(1)): m.group(2) for _, line in self.lines if (m := LOSS.match(line))}

    def descendants(self) -> list:
        import psutil

        found = psutil.Process(self.proc.pid).children(recursive=True)
        self.seen.update({p.pid: p for p in found})
        return found

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill_all(self) -> None:
        """Cleanup of whatever is left (exact pids of this job's process tree)."""
        import psutil

        procs = list(self.seen.values())
        try:
            procs = [psutil.Process(self.proc.pid)] + self.descendants() + procs
        except psutil.NoSuchProcess:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


def _alive(procs) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkill_during_a_checkpoint_write_then_resume_with_the_uninterrupted_losses(tmp_path):
    save = tmp_path / "ckpt"
    args = TINY + ["train.steps=6", f"checkpoint.save_dir={save}", "checkpoint.save_interval=2"]
    # The writers of step 4's save wait 600 s before writing: the run trains to step 6, then waits
    # for that save, which is never complete.
    job = _Job(_torchrun(2, free_port()) + args, _env("slow_save@4=600"))
    try:
        job.wait_for(lambda: "step      6/6" in job.text and (save / ".iter_0000004.partial").is_dir(), 240)
        family = job.descendants()  # the two trainers, their writers, their writers' report managers
        assert len(family) >= 3
        os.kill(job.proc.pid, signal.SIGKILL)  # the agent alone: the rest must go with it
        deadline = time.time() + 20
        while _alive(family) and time.time() < deadline:
            time.sleep(0.2)
        assert _alive(family) == [], "processes outlived the killed torchrun agent"
    finally:
        job.kill_all()
    uninterrupted = job.losses()
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (save / "iter_0000004").exists() and (save / ".iter_0000004.partial").is_dir()

    resumed = _Job(_torchrun(2, free_port()) + args, _env())
    assert resumed.finish() == 0, resumed.text[-3000:]
    assert f"resumed from {save} at step 2 (16 samples consumed)" in resumed.text
    # Steps 3-6 are redone from step 2's state: the same losses as before the kill.
    assert resumed.losses() == {s: uninterrupted[s] for s in (3, 4, 5, 6)}
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert not (save / ".iter_0000004.partial").exists()  # the leftover was replaced by the new save


def test_sigterm_to_every_process_of_the_job_still_saves(tmp_path):
    """What ``scancel`` or a time limit does: SIGTERM to every process of the job, helpers included
    (megatron's writer-report manager, which the pre-emption save needs), not only the trainers."""
    args = TINY + ["train.steps=500", f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=0",
                   "checkpoint.save_at_end=false"]
    job = _Job(_torchrun(2, free_port()) + args, _env())
    try:
        job.wait_for(lambda: "step      3/" in job.text, 240)
        for p in job.descendants():  # the agent is left out: it would stop the workers itself
            os.kill(p.pid, signal.SIGTERM)
        rc = job.finish(timeout=240)
    finally:
        job.kill_all()
    assert rc == 0, job.text[-3000:]
    assert "pre-emption signal: stopped after step" in job.text
    stopped = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())
    assert (tmp_path / f"iter_{stopped:07d}" / "prolong_meta.json").is_file()


def test_the_diverging_run_from_the_issue_stops_naming_the_steps_and_saves_no_nan(tmp_path):
    out = subprocess.run([sys.executable, "pretrain_prolong.py", "--config", "examples/tiny_cpu.yaml", "optim.lr=1e6",
                          "train.steps=8", f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=4"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    stopped = re.search(r"^error: training stopped at step (\d+): 3 consecutive steps were skipped \(steps (\d+)-(\d+)",
                        out.stderr, re.M)
    assert stopped, out.stderr[-2000:]
    first_bad = int(stopped.group(2))
    assert int(stopped.group(1)) == int(stopped.group(3)) == first_bad + 2
    assert f"step {first_bad} skipped: non-finite" in out.stdout
    assert "Traceback" not in out.stderr
    # Whatever was saved holds finite values only (on this machine: nothing, the streak starts
    # before the first save is due, and that save is deferred).
    saved = sorted(p.name for p in tmp_path.glob("iter_*"))
    for name in saved:
        check = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(tmp_path), "-i", name[5:], "--verify"],
                               cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout
    if first_bad <= 4:
        assert saved == [] and not (tmp_path / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_peer_lost_mid_step_fails_the_survivor_within_the_timeout(fault):
    timeout_s = 15
    port = free_port()
    args = TINY + ["train.steps=50", "checkpoint.save_dir=null", "checkpoint.save_interval=0",
                   f"train.collective_timeout_minutes={timeout_s / 60}"]
    jobs = [_Job(_torchrun(1, port, "--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1") + args,
                 _env(f"{fault}@3:1")) for node in (0, 1)]
    try:
        survivor, lost = jobs
        lost.wait_for(lambda: "[fault injection] rank 1" in lost.text, 240)
        rc = survivor.finish(timeout=timeout_s + 120)
        failed_after = survivor.proc.returncode is not None and time.time() - lost.time_of("[fault injection]")
    finally:
        for job in jobs:
            job.kill_all()
    assert rc != 0
    assert "error: a collective failed" in survivor.text and "collective_timeout_minutes=0.25" in survivor.text
    assert "step      2/50" in survivor.text and "step      3/50" not in survivor.text
    if fault == "exit":  # the connection drops: no need to wait for the timeout
        assert failed_after < timeout_s + 10
    else:
        assert "Timed out" in survivor.text
        assert timeout_s - 1 < failed_after < timeout_s + 30


def test_a_damaged_tensor_file_is_named_by_the_trainer_and_by_checkpoint_info(tmp_path):
    from megatron_prolong.training.checkpoint_integrity import read_index

    args = TINY + ["train.steps=4", f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=0"]
    first = subprocess.run([sys.executable, "pretrain_prolong.py", *args, "train.exit_at_step=2"], cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "iter_0000002"
    index = read_index(ckpt)
    record = next(info for idx, info in index.storage_data.items() if idx.fqn == "decoder.layers.mlp.linear_fc1.weight")
    damaged = ckpt / record.relative_path
    with open(damaged, "r+b") as f:  # scribble over the start of one tensor's record
        f.seek(record.offset)
        f.write(b"\x00garbage" * 8)

    out = subprocess.run(_torchrun(2, free_port()) + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert f"{damaged}: a stored record cannot be read (UnpicklingError); the file is damaged" in out.stderr
    assert "step " not in out.stdout
    frames = [t for t in out.stderr.splitlines() if t.strip().startswith('File "')]
    assert not [f for f in frames if "megatron_prolong" in f or "pretrain_prolong.py" in f], frames

    info = subprocess.run([sys.executable, "tools/checkpoint_info.py", str(tmp_path), "--verify"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert info.returncode == 1
    assert "verify: DAMAGED" in info.stdout
    assert f"problem: {damaged}: decoder.layers.mlp.linear_fc1.weight" in info.stdout
