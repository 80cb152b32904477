"""The trainer's checkpoint layout (owned by ``megatron_prolong.training.checkpoint``) plus the
converter's own output discipline (refuse non-empty outputs, stage, then rename).

::

    DIR/latest_checkpointed_iteration.txt     latest complete iteration (written last)
    DIR/iter_0000010/                         megatron dist_checkpointing (torch_dist) directory
    DIR/iter_0000010/prolong_meta.json        {"iteration", "model_spec", "parallel", "has_optimizer", ...}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# One definition of the layout: the trainer's.
from ..training.checkpoint import (LATEST_FILE, META_FILE, CheckpointError, iteration_dir, latest_iteration,
                                   read_checkpoint_meta)

__all__ = ["LATEST_FILE", "META_FILE", "CheckpointError", "check_output_dir", "iteration_dir", "latest_iteration",
           "publish", "read_checkpoint_meta", "resolve_checkpoint", "staging_dir"]


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


def staging_dir(out: Path) -> Path:
    """A hidden sibling folder to build the result in; it appears as ``out`` only by a final
    rename, so a crash never leaves something that looks complete."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished staging folder to ``out`` (replacing ``out`` if it is an empty folder)."""
    out = Path(out).resolve()
    if out.exists():
        out.rmdir()  # checked empty before starting; rmdir refuses otherwise
    os.replace(tmp, out)
