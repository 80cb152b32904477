"""What the loop does about bad steps: count consecutive skipped steps, stop after too many, and
report loss spikes. The skip itself is ``step.guarded_optimizer_step``; this is bookkeeping that
every rank does identically (its inputs are the same on every rank)."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

from ..errors import TrainingStopped


@dataclass
class SkippedStep:
    step: int
    reason: str
    first_sample: int
    """The skipped global batch is samples ``[first_sample, first_sample + global batch)``."""


class StepGuard:
    def __init__(self, *, max_bad_steps: int, global_batch_size: int, log=None, spike_factor: float = 0.0,
                 spike_window: int = 50, consecutive_skipped: int = 0):
        self.max_bad_steps, self.global_batch_size = max_bad_steps, global_batch_size
        self.log = log
        """A ``ProgressLogger`` (``info``, ``scalar``), or None for silence."""
        self.spike_factor = spike_factor
        self.recent_losses: deque[float] = deque(maxlen=spike_window)
        self.streak: list[SkippedStep] = []
        self.carried = consecutive_skipped
        """Skipped steps right before the checkpoint this run resumed (they count on)."""

    @property
    def consecutive_skipped(self) -> int:
        return self.carried + len(self.streak)

    def record(self, step: int, out, consumed_before: int) -> list[str]:
        """Account for ``step`` (a ``StepResult``); logs and returns its messages."""
        messages = []
        if out.skipped:
            self.streak.append(SkippedStep(step, out.skip_reason or "non-finite", consumed_before))
            messages.append(f"step {step} skipped: {out.skip_reason}; weights, optimizer state and LR schedule "
                            f"unchanged, samples {consumed_before}-{consumed_before + self.global_batch_size - 1} "
                            f"consumed ({self.consecutive_skipped}/{self.max_bad_steps} consecutive)")
        else:
            if self.streak or self.carried:
                messages.append(f"step {step} applied after {self.consecutive_skipped} skipped step(s)")
            self.streak, self.carried = [], 0
            spike = self.spike_ratio(out.loss)
            if spike is not None:
                messages.append(f"loss spike at step {step}: {out.loss:.4f} is {spike:.1f}x the median of the "
                                f"last {len(self.recent_losses)} steps")
                if self.log is not None:
                    self.log.scalar("train/loss_spike", spike, step)
            self.recent_losses.append(out.loss)
        if self.log is not None:
            for message in messages:
                self.log.info(message)
        return messages

    def spike_ratio(self, loss: float) -> Optional[float]:
        """``loss / running median`` when above ``spike_factor`` (needs 10 losses first)."""
        if not self.spike_factor or len(self.recent_losses) < 10:
            return None
        median = statistics.median(self.recent_losses)
        if median > 0 and loss > self.spike_factor * median:
            return loss / median
        return None

    @property
    def exhausted(self) -> bool:
        return bool(self.streak) and self.consecutive_skipped >= self.max_bad_steps

    def stop_error(self, latest: Optional[int]) -> TrainingStopped:
        first, last = self.streak[0], self.streak[-1]
        where = f"step {first.step}" if first is last else f"steps {first.step}-{last.step}"
        reasons = sorted({s.reason for s in self.streak})
        kept = (f"the latest checkpoint is still iteration {latest}" if latest is not None
                else "no checkpoint had been saved")
        return TrainingStopped(
            f"training stopped at step {last.step}: {self.consecutive_skipped} consecutive steps were skipped "
            f"({where}: {'; '.join(reasons)}), train.max_bad_steps={self.max_bad_steps}. Nothing was saved "
            f"from this streak; {kept}. Lower optim.lr or inspect the data of samples "
            f"{first.first_sample}-{last.first_sample + self.global_batch_size - 1}, then relaunch")
