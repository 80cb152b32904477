"""The trainer's checkpoint layout (owned by ``megatron_prolong.training.checkpoint``) plus the
converter's own output discipline (refuse non-empty outputs, stage, then rename).

::

    DIR/latest_checkpointed_iteration.txt     latest complete iteration (written last)
    DIR/iter_0000010/                         megatron dist_checkpointing (torch_dist) directory
    DIR/iter_0000010/prolong_meta.json        {"iteration", "model_spec", "parallel", "has_optimizer", ...}
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

# One definition of the layout: the trainer's.
from ..training.checkpoint import (LATEST_FILE, META_FILE, CheckpointError, iteration_dir, latest_iteration,
                                   read_checkpoint_meta)

__all__ = ["LATEST_FILE", "META_FILE", "CheckpointError", "check_output_dir", "iteration_dir", "latest_iteration",
           "read_checkpoint_meta", "resolve_checkpoint", "staged_output"]


def resolve_checkpoint(root: Path, iteration: int | None) -> tuple[Path, int]:
    """``(iteration directory, iteration)``; the latest complete one unless ``iteration`` is given."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            found = sorted(p.name for p in root.glob("iter_*"))
            raise CheckpointError(f"{root}: no {LATEST_FILE}, so no complete checkpoint; iteration folders "
                                  f"present: {found or 'none'} (pass --iteration N to pick one)")
    path = iteration_dir(root, iteration)
    if not (path / META_FILE).is_file() or not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (needs {META_FILE} and metadata.json)")
    return path, iteration


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
