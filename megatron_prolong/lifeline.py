"""Processes that must not outlive their parent: ``exit_with_parent`` (Linux ``PR_SET_PDEATHSIG``).

Who calls it: each trainer started by torchrun (its parent is the agent), each forked checkpoint
writer (its parent is the trainer), and the manager process megatron's checkpoint writers report
through. torchrun starts each worker in a session of its own, so a SIGKILL of the agent alone (the
OOM killer, a scheduler's hard kill) would leave the workers running - training unsupervised, or
waiting in a collective on peers that went with the agent - and their helpers with them. None of
them is needed once its parent is gone: an agent that exits normally has already stopped its
workers, and a trainer that exits normally has waited for its writers. Checkpoints stay
consistent: a save that did not finish is never marked complete.

Light on purpose (no torch): the manager process imports this module to run it.
"""

from __future__ import annotations

import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits. Linux only
    (a no-op elsewhere, where the collective timeout still ends a rank whose peers are gone)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def helper_process_init() -> None:
    """For a trainer's helper process (the writers' report manager): go when the trainer goes, and
    only then. A scheduler's SIGTERM (``scancel``, a time limit) reaches every process of the job;
    the trainer answers it by saving a checkpoint, which needs this helper alive."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    exit_with_parent()
