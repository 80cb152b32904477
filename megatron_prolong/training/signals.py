"""SIGTERM / SIGUSR1 (Slurm pre-emption): finish the step, save, exit - agreed on by all ranks."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = False
        self._previous = {}

    def __enter__(self):
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
        """Collective: true on every rank if any rank got a signal (so all save together)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
