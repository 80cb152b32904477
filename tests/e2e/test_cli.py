"""``pretrain_prolong.py`` as users run it: torchrun, 2 processes, progress lines, clear failures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prolong.training.signals import EXIT_STATUS_FILE
from tests.dist import free_port

ROOT = Path(__file__).resolve().parents[2]


def _run(args, nproc=1, timeout=600, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "pretrain_prolong.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
def test_two_process_run_prints_progress_and_checkpoints(tmp_path):
    status = tmp_path / "exit_status"
    out = _run(["--config", "examples/tiny_cpu.yaml", "train.steps=4", "train.seq_length=64",
                f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=2",
                f"logging.tensorboard_dir={tmp_path / 'tb'}"], nproc=2, env={EXIT_STATUS_FILE: str(status)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert status.read_text() == "finished 4 4\n"  # what the sbatch script reads: nothing to requeue
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 4
    pattern = (r"step +\d+/4 \| loss \d+\.\d+ \| lr [\d.e+-]+ \| grad norm \d+\.\d+ \| tokens/s [\d,]+ \([\d,]+/rank\) \| "
               r"elapsed \d+:\d\d:\d\d \| remaining \d+:\d\d:\d\d")
    assert all(re.match(pattern, l) for l in lines), lines
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (tmp_path / "iter_0000002").is_dir() and (tmp_path / "iter_0000004").is_dir()
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--config", "examples/nope.yaml"], "does not exist"),
    (["--config", "examples/tiny_cpu.yaml", "parallel.tensr=2"], "did you mean parallel.'tensor'"),
    (["--config", "examples/tiny_cpu.yaml", "parallel.tensor=2"], "not divisible by TP x PP x CP"),
    (["--config", "examples/tiny_cpu.yaml", "data.mock=false", "data.blend={/no/such/prefix: 1.0}",
      "checkpoint.save_dir=null", "checkpoint.save_interval=0"], "/no/such/prefix"),
])
def test_bad_input_fails_fast_with_a_clear_message(args, message):
    out = _run(args, timeout=300)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    assert "step " not in out.stdout


@pytest.mark.distributed
def test_slurm_style_preemption_through_torchrun(tmp_path):
    """What examples/slurm/launch_node.sh does: torchrun's agent ignores SIGUSR1, the signal goes to
    the agent's children (the trainers), the ranks save together, exit 0 and report "preempted"
    (so the sbatch script requeues); the relaunch resumes."""

    status = tmp_path / "exit_status"
    args = ["--config", "examples/tiny_cpu.yaml", "train.steps=200", "train.seq_length=64",
            f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=0", "checkpoint.save_at_end=false"]
    launch = (f"trap '' USR1; exec {sys.executable} -m torch.distributed.run --nproc-per-node 2 "
              f"--master-port {free_port()} pretrain_prolong.py " + " ".join(args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", EXIT_STATUS_FILE: str(status)}
    proc = subprocess.Popen(["bash", "-c", launch], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step      3/"):
                # launch_node.sh --signal: the children of this job's agent (exec kept its PID).
                subprocess.run(["pkill", "-USR1", "-P", str(proc.pid)], check=True)
                break
        lines.extend(proc.stdout)
        assert proc.wait(timeout=300) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:  # never leave a run behind (trainers sit in sessions of their own)
            subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)])
    text = "".join(lines)
    assert "pre-emption signal: stopped after step" in text
    stopped = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < 200
    assert status.read_text() == f"preempted {stopped} 200\n"
    out = _run(args + [f"train.exit_at_step={stopped + 1}"], nproc=2, env={EXIT_STATUS_FILE: str(status)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert status.read_text() == f"stopped {stopped + 1} 200\n"  # train.exit_at_step: not to requeue
    assert f"resumed from {tmp_path} at step {stopped}" in out.stdout
    assert f"step {stopped + 1:>6}/200" in out.stdout


def test_print_config_resolves_overrides_and_derived_values(tmp_path):
    import yaml

    from megatron_prolong.config import load_config

    out = subprocess.run([sys.executable, "pretrain_prolong.py", "--config", "examples/prolong_64k.yaml",
                          "--print-config", "optim.lr=2e-5", "checkpoint.init_from=null"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["optim"]["lr"] == 2e-5
    assert cfg["train"]["global_batch_size"] == 64  # 4M tokens / 64K
    assert cfg["model"]["rotary_base"] == 8e6
    resolved = tmp_path / "resolved.yaml"  # the printout is itself a recipe
    resolved.write_text(out.stdout)
    assert load_config(resolved).to_dict() == cfg


def test_config_error_under_torchrun_is_one_line_and_ends_the_output():
    """A mistake found after start-up (TE asked for where it cannot run) is reported by rank 0
    as one line, no rank prints a traceback, and torchrun's failure block (printed last) names
    the same line as the root cause instead of burying it."""
    out = _run(["--config", "examples/tiny_cpu.yaml", "model.transformer_engine=on",
                "checkpoint.save_dir=null", "checkpoint.save_interval=0"], nproc=2, timeout=300)
    assert out.returncode != 0
    line = "config error: model.transformer_engine=on but"
    printed = [t for t in out.stderr.splitlines() if t.startswith("config error:")]
    assert len(printed) <= 1, printed  # rank 0 only (it may be stopped by torchrun before printing)
    tail = out.stderr.strip().splitlines()[-4:]
    assert any(line in t for t in tail), tail
    frames = [t for t in out.stderr.splitlines() if t.strip().startswith('File "')]
    assert not [f for f in frames if "megatron_prolong" in f or "pretrain_prolong.py" in f], frames


def test_sigterm_is_not_swallowed_when_exit_on_signal_is_off(tmp_path):
    """With checkpoint.exit_on_signal=false the trainer installs no handler: SIGTERM ends it at
    once (a swallowed signal would let it train on to step 500)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "pretrain_prolong.py", "--config", "examples/tiny_cpu.yaml",
                             "train.steps=500", "train.seq_length=64", "checkpoint.exit_on_signal=false",
                             f"checkpoint.save_dir={tmp_path}", "checkpoint.save_interval=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step      2/"):
                proc.send_signal(signal.SIGTERM)
                break
        t0 = time.time()
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert time.time() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "latest_checkpointed_iteration.txt").exists()
