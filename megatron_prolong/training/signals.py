"""SIGTERM / SIGUSR1 (Slurm pre-emption): finish the step, save, exit - agreed on by all ranks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist


PREEMPTED = "pre-emption signal"

EXIT_STATUS_FILE = "PROLONG_EXIT_STATUS_FILE"
"""Environment variable naming a file where the trainer writes how it ended, for a launcher that
decides whether to requeue (examples/slurm/train.sbatch requeues only on ``preempted``)."""


def write_exit_status(*, preempted: bool, iteration: int, steps: int) -> None:
    """``finished``, ``preempted`` (stopped by a signal with steps left) or ``stopped``
    (``train.exit_at_step``), then the step reached and ``train.steps``. Written by the first rank
    of each node where the variable is set (all ranks agree on the stop): a node-local path works."""
    path = os.environ.get(EXIT_STATUS_FILE)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    state = "finished" if iteration >= steps else "preempted" if preempted else "stopped"
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # atomic: the launcher never reads half a line
    tmp.write_text(f"{state} {iteration} {steps}\n")
    os.replace(tmp, path)


class PreemptionSignal:
    """While active (``enabled``), SIGTERM / SIGUSR1 only set a flag that the loop checks at the
    next step boundary. Disabled (``checkpoint.exit_on_signal=false``), nothing is installed, so
    the signals keep their usual effect (SIGTERM ends the process) instead of being swallowed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = False
        self._previous = {}

    def __enter__(self):
        if self.enabled:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        self.received = True

    def any_rank_received(self, device: torch.device) -> bool:
        """Collective when enabled: true on every rank if any rank got a signal (so all save
        together)."""
        if not self.enabled:
            return False
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
