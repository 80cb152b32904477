"""The trainer's checkpoint directory layout, as far as the converter needs it.

::

    DIR/latest_checkpointed_iteration.txt     latest complete iteration (written last)
    DIR/iter_0000010/                         megatron dist_checkpointing (torch_dist) directory
    DIR/iter_0000010/prolong_meta.json        {"iteration", "model_spec", "parallel", "has_optimizer", ...}

Reading prefers ``megatron_prolong.training.checkpoint`` (the trainer's own code) when it is
importable, so the two cannot drift; the fallbacks implement the same documented layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRACKER_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "prolong_meta.json"


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: Path) -> int | None:
    try:
        from ..training.checkpoint import latest_iteration as trainer_latest
    except ImportError:
        trainer_latest = None
    if trainer_latest is not None:
        return trainer_latest(root)
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    return int(tracker.read_text().strip())


def read_meta(root: Path, iteration: int | None = None) -> dict:
    try:
        from ..training.checkpoint import read_checkpoint_meta
    except ImportError:
        read_checkpoint_meta = None
    if read_checkpoint_meta is not None:
        return read_checkpoint_meta(root, iteration)
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{root}: no {TRACKER_FILE}; is this a megatron-prolong checkpoint "
                                    "directory? (pass --iteration N to pick one explicitly)")
    path = iteration_dir(root, iteration) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return json.loads(path.read_text())


def resolve_checkpoint(root: Path, iteration: int | None) -> tuple[Path, int]:
    """``(iteration directory, iteration)``, from the tracker file unless ``iteration`` is given."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint directory")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            found = sorted(p.name for p in root.glob("iter_*"))
            raise FileNotFoundError(f"{root}: no {TRACKER_FILE} (no complete checkpoint); "
                                    f"iteration folders present: {found or 'none'}")
    path = iteration_dir(root, iteration)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path}: not a complete dist checkpoint (no metadata.json)")
    return path, iteration


def check_output_dir(out: Path) -> None:
    """Refuse to write into a non-empty folder (we never merge into or overwrite results)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new path")


def staging_dir(out: Path) -> Path:
    """A sibling temp folder: the result appears under ``out`` only by a final rename."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Atomically move the finished staging folder to ``out`` (replacing an empty ``out``)."""
    out = Path(out).resolve()
    if out.exists():
        out.rmdir()  # empty (checked before starting); rmdir refuses otherwise
    os.replace(tmp, out)
