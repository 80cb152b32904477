"""What a checkpoint folder looks like on disk: file names, metadata, the stored model spec.

Light (no torch, no megatron-core): the trainer, the converters and ``tools/checkpoint_info.py``
all read and write checkpoints through these names, so there is one definition of the layout::

    SAVE_DIR/latest_checkpointed_iteration.txt    newest *complete* iteration; replaced atomically
    SAVE_DIR/iter_0000010/                        megatron dist_checkpointing (torch_dist) folder
    SAVE_DIR/iter_0000010/prolong_meta.json       model spec, parallel layout, train state; written last
    SAVE_DIR/.iter_0000010.partial/               a save in progress (renamed when every rank finished)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

from .models.registry import ModelSpec

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "prolong_meta.json"
DIST_METADATA_FILE = "metadata.json"
"""Written by megatron's dist_checkpointing into every complete checkpoint folder."""
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_PARTIAL_RE = re.compile(r"^\.iter_(\d{7})\.partial$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file and the way out."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def partial_dir(root: str | Path, iteration: int) -> Path:
    """Where a save of ``iteration`` is written before it is complete."""
    return Path(root) / f".iter_{iteration:07d}.partial"


def list_iterations(root: str | Path) -> list[int]:
    """Iterations with a complete folder (metadata written), ascending."""
    out = []
    for p in Path(root).iterdir() if Path(root).is_dir() else []:
        m = _ITER_RE.match(p.name)
        if m and (p / META_FILE).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def list_partials(root: str | Path) -> list[Path]:
    """Leftovers of interrupted saves (``.iter_N.partial``) and iteration folders without metadata."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if _PARTIAL_RE.match(p.name) or (_ITER_RE.match(p.name) and not (p / META_FILE).is_file()):
            out.append(p)
    return out


def latest_iteration(root: str | Path) -> Optional[int]:
    """The newest complete iteration in ``root``, or None when there is none."""
    marker = Path(root) / LATEST_FILE
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{marker} holds {text!r}, not an iteration number") from None
    if not (iteration_dir(root, iteration) / META_FILE).is_file():
        raise CheckpointError(f"{marker} points at iteration {iteration} but "
                              f"{iteration_dir(root, iteration)} is missing or incomplete")
    return iteration


def resolve_checkpoint(root: str | Path, iteration: Optional[int] = None, *,
                       require_tensors: bool = True) -> tuple[Path, int]:
    """``(iteration folder, iteration)``: the latest complete one unless ``iteration`` is given.
    ``require_tensors``: megatron's own metadata must be there too (a model/optimizer is read)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist (no such checkpoint directory)")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            found = sorted(p.name for p in root.glob("iter_*"))
            raise CheckpointError(f"{root} holds no complete checkpoint ({LATEST_FILE} is missing); iteration "
                                  f"folders present: {found or 'none'} (pick one by its number)")
    path = iteration_dir(root, iteration)
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path / META_FILE} is missing: iteration {iteration} is not a complete checkpoint")
    if require_tensors and not (path / DIST_METADATA_FILE).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (needs {META_FILE} and {DIST_METADATA_FILE})")
    return path, iteration


def read_checkpoint_meta(root: str | Path, iteration: Optional[int] = None) -> dict:
    """The metadata of a checkpoint (latest when ``iteration`` is None)."""
    path, _ = resolve_checkpoint(root, iteration, require_tensors=False)
    meta_path = path / META_FILE
    try:
        return json.loads(meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}); the checkpoint is damaged") from None


def write_checkpoint_meta(folder: str | Path, meta: dict) -> None:
    """Write the metadata file into a checkpoint folder (the last file of a save)."""
    write_atomic(Path(folder) / META_FILE, json.dumps(meta, indent=2))


def encode_model_spec(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def decode_model_spec(data: dict, where: str = "checkpoint") -> ModelSpec:
    """The stored spec; fields this version does not know are an error (never silently dropped)."""
    known = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{where}: model_spec has fields this version of megatron-prolong does not "
                              f"know: {unknown}; use the version that wrote it, or upgrade")
    missing = sorted(f.name for f in dataclasses.fields(ModelSpec)
                     if f.name not in data and f.default is dataclasses.MISSING)
    if missing:
        raise CheckpointError(f"{where}: model_spec lacks required fields {missing}; the metadata is damaged")
    return ModelSpec(**data)


def model_spec_from_meta(meta: dict, where: str = "checkpoint") -> ModelSpec:
    if "model_spec" not in meta:
        raise CheckpointError(f"{where}: {META_FILE} has no model_spec")
    return decode_model_spec(meta["model_spec"], where)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step (a crash leaves the old or the new content, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
