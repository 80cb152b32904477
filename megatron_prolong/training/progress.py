"""Progress lines on stdout and TensorBoard scalars, from one rank."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Optional

import torch


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class ProgressLogger:
    def __init__(self, total_steps: int, start_step: int, enabled: bool,
                 tensorboard_dir: Optional[str] = None, interval: int = 1, world_size: int = 1,
                 cuda_memory: bool = False):
        self.total, self.start, self.enabled, self.interval = total_steps, start_step, enabled, interval
        self.world_size = world_size
        self.cuda_memory = cuda_memory
        self.step_seconds: list[float] = []
        self._t_step = time.time()
        self.t0 = self.t_last = time.time()
        self.tokens_since = 0
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, skipped: bool) -> None:
        now = time.time()
        self.step_seconds.append(now - self._t_step)
        self._t_step = now
        self.tokens_since += tokens
        if self.writer is not None:
            for name, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", grad_norm),
                                ("train/skipped", float(skipped))):
                self.writer.add_scalar(name, value, step)
        if not self.enabled or (step % self.interval and step != self.total):
            return
        now = time.time()
        tok_s = self.tokens_since / max(now - self.t_last, 1e-9)
        done = step - self.start
        remaining = (now - self.t0) / max(done, 1) * (self.total - step)
        flag = " (skipped)" if skipped else ""
        memory = ""
        if self.cuda_memory:  # this rank's peak since the last line: what OOM hunting needs
            memory = f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            torch.cuda.reset_peak_memory_stats()
        print(f"step {step:>6}/{self.total} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
              f"tokens/s {tok_s:,.0f} ({tok_s / self.world_size:,.0f}/rank){memory} | "
              f"elapsed {_hms(now - self.t0)} | remaining {_hms(remaining)}{flag}", flush=True)
        if self.writer is not None:
            self.writer.add_scalar("train/tokens_per_second", tok_s, step)
        self.t_last, self.tokens_since = now, 0

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def skip_pause(self) -> None:
        """Leave out time spent outside training steps (checkpoint saves) from tokens/s."""
        self.t_last = self._t_step = time.time()

    def typical_step_seconds(self) -> Optional[float]:
        """Median seconds per step so far (the first step, with its compilation, counts only alone)."""
        times = self.step_seconds[1:] or self.step_seconds
        return sorted(times)[len(times) // 2] if times else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
