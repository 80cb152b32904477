"""Fault injection for the fault-tolerance tests; inert unless ``PROLONG_FAULTS`` is set.

The tests launch the real trainer (torchrun, several processes) and need faults at exact points,
so the points are named here and nowhere else::

    PROLONG_FAULTS="nan@3:1,slow_save@4=20" torchrun ... pretrain_prolong.py ...

Each entry is ``KIND@STEP[:RANK][=SECONDS]`` (no rank: every rank):

``nan``        the micro-batches of step STEP carry a NaN loss (a poisoned batch): the loss and
               every gradient become NaN through the usual reductions;
``exit``       the rank ends with ``os._exit(1)`` when it fetches its last micro-batch of STEP,
               i.e. mid-step, after the earlier micro-batches' forward/backward and before the
               gradient reduction its peers wait in;
``hang``       the rank sleeps for SECONDS (default: an hour) at that point instead;
``slow_save``  the checkpoint writer of step STEP sleeps SECONDS before writing its files (the
               ``.partial`` folder exists, the save cannot be finalised): a window in which to kill
               the job mid-save, or in which training goes on past a background save.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

ENV = "PROLONG_FAULTS"
KINDS = ("nan", "exit", "hang", "slow_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int]
    seconds: float

    def applies(self, step: int) -> bool:
        return self.step == step and (self.rank is None or self.rank == _rank())


def parse(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        try:
            kind, rest = entry.split("@", 1)
            rest, _, seconds = rest.partition("=")
            step, _, rank = rest.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None, float(seconds) if seconds else 3600.0)
        except ValueError:
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected KIND@STEP[:RANK][=SECONDS]") from None
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault {kind!r} in {entry!r}; one of {KINDS}")
        faults.append(fault)
    return faults


def active(kind: str, step: int) -> Optional[Fault]:
    """The fault of ``kind`` planned for ``step`` on this rank, if any."""
    text = os.environ.get(ENV)
    if not text:
        return None
    return next((f for f in parse(text) if f.kind == kind and f.applies(step)), None)


def inject(step: int, micro_batches: Iterator[dict]) -> Iterator[dict]:
    """Step ``step``'s micro-batches with this rank's planned faults applied."""
    poison = active("nan", step)
    stop = active("exit", step) or active("hang", step)
    if poison is None and stop is None:
        return micro_batches
    return _faulty(list(micro_batches), poison is not None, stop)


def _faulty(batches: list[dict], poison: bool, stop: Optional[Fault]) -> Iterator[dict]:
    for i, batch in enumerate(batches):
        if stop is not None and i == len(batches) - 1:
            print(f"[fault injection] rank {_rank()}: {stop.kind} mid-step {stop.step}", flush=True)
            if stop.kind == "exit":
                os._exit(1)
            time.sleep(stop.seconds)
        if poison:
            batch = {**batch, "inject_nan_loss": True}
        yield batch


def before_write(iteration: int) -> None:
    """Called by a checkpoint writer before it writes this rank's files."""
    fault = active("slow_save", iteration)
    if fault is not None:
        time.sleep(fault.seconds)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))
