"""The converter's output discipline (refuse non-empty outputs, stage, then rename) and checkpoint
lookup, on the one checkpoint layout (``megatron_prolong.checkpoint_layout``)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..checkpoint_layout import (LATEST_FILE, META_FILE, CheckpointError, iteration_dir, latest_iteration,
                                 read_checkpoint_meta, resolve_checkpoint)

__all__ = ["LATEST_FILE", "META_FILE", "CheckpointError", "check_output_dir", "iteration_dir", "latest_iteration",
           "read_checkpoint_meta", "resolve_checkpoint", "staged_output"]


def check_output_dir(out: Path) -> None:
    """Refuse to write into a non-empty folder: results are never merged or overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new path")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Build the result in a hidden sibling folder that becomes ``out`` by a final rename only when
    the block succeeds, and is deleted when it fails: a crash never leaves something that looks
    complete."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # checked empty before starting; rmdir refuses otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
