"""Progress lines for long conversions: bytes done, elapsed time, resident memory."""

from __future__ import annotations

import time
from typing import Callable


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # psutil is a dependency, but progress lines must never fail a conversion
        return 0


class Progress:
    """Prints one line per finished unit (a layer, or a large non-layer tensor)."""

    def __init__(self, name: str, total_bytes: int, log: Callable[[str], None]):
        self.name, self.total, self.log = name, max(total_bytes, 1), log
        self.done_bytes = 0
        self.start = time.perf_counter()
        self._label: str | None = None

    def advance(self, nbytes: int, label: str) -> None:
        if self._label is not None and label != self._label:
            self._emit(self._label)
        self._label = label
        self.done_bytes += nbytes

    def _emit(self, label: str) -> None:
        self.log(f"[{self.name}] {label:<40} {100 * self.done_bytes / self.total:5.1f}%  "
                 f"{self.done_bytes / 1e9:7.2f} GB  {time.perf_counter() - self.start:7.1f}s  "
                 f"RSS {rss_bytes() / 1e9:.2f} GB")

    def done(self) -> None:
        if self._label is not None:
            self._emit(self._label)
            self._label = None
        self.log(f"[{self.name}] done: {self.done_bytes / 1e9:.2f} GB in {time.perf_counter() - self.start:.1f}s")
