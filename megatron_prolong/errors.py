"""User mistakes end a run with one clear line, not a traceback per rank.

A ``ConfigError`` follows from the config alone, so every rank raises the same one: rank 0 prints
it; so does a ``TrainingStopped`` (a decision all ranks took together). Data, checkpoint and
collective errors can differ between ranks (a file missing on one node, a peer gone): each rank
that hits one prints its line, prefixed with its rank when there are several.

Under torchrun, the agent's "ChildFailedError" block comes after everything the ranks printed and
would bury the message; the line is also written to torchrun's per-rank error file
(``TORCHELASTIC_ERROR_FILE``), which that block shows as the root cause.
"""

from __future__ import annotations

import json
import os
import sys
import time

from .checkpoint_layout import CheckpointError
from .config import ConfigError
from .data.indexed import DataError


class TrainingStopped(RuntimeError):
    """The run stopped itself on a decision every rank took together (too many non-finite steps,
    a refusal to save non-finite weights); reported once, by rank 0, without a traceback."""


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer died (connection lost) or did not answer within the
    collective timeout. Each surviving rank reports it; the cause is on the rank that failed first."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, TrainingStopped, CollectiveError)
"""Exceptions that are the user's input or a decision of the run, not a bug: reported without a
traceback."""

EXIT_CONFIG = 2
EXIT_INPUT = 1


def report_error(error: BaseException) -> int:
    """Print ``error`` as one line (see module doc) and return the process exit code."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(error, ConfigError):
        line, code, show = f"config error: {error}", EXIT_CONFIG, rank == 0
    elif isinstance(error, TrainingStopped):
        line, code, show = f"error: {error}", EXIT_INPUT, rank == 0
    else:
        line, code, show = f"error: {error}", EXIT_INPUT, True
        if world > 1:
            line = f"[rank {rank}] {line}"
    if show:
        print(line, file=sys.stderr, flush=True)
    _write_torchelastic_error_file(line)
    return code


def _write_torchelastic_error_file(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The format torch.distributed.elastic's ProcessFailure reads; it shows `py_callstack`.
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the message was printed; the summary is a convenience
