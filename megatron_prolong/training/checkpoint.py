"""Checkpoints: megatron-core dist_checkpointing (resharded on load), written then marked complete.

Layout of ``save_dir``::

    iter_0000010/                  dist_checkpointing directory: {"model", "optimizer", "rng", ...}
    iter_0000010/prolong_meta.json model spec, parallel layout, train state; written last inside
    latest_checkpointed_iteration.txt   the newest *complete* iteration; replaced atomically

A save goes to ``.iter_0000010.partial`` and is renamed only after every rank finished writing,
so a crash or pre-emption mid-save never leaves something that looks like a checkpoint.
A model-only checkpoint (no optimizer; what the Hugging Face converter writes) initialises a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..models.registry import ModelSpec
from . import mcore_fixes

LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "prolong_meta.json"
DEFAULT_OPTIMIZER_FORMAT = "fully_reshardable"  # canonical per-parameter state: any layout on load


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


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


def read_checkpoint_meta(root: str | Path, iteration: Optional[int] = None) -> dict:
    """The metadata of a checkpoint (latest when ``iteration`` is None)."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"{root} holds no complete checkpoint ({LATEST_FILE} is missing)")
    meta_path = iteration_dir(root, iteration) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: iteration {iteration} is not a complete checkpoint")
    return json.loads(meta_path.read_text())


def model_spec_from_meta(meta: dict) -> ModelSpec:
    return ModelSpec(**meta["model_spec"])


def _rng_state() -> ShardedObject:
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    cp = parallel_state.get_context_parallel_rank()
    return ShardedObject(
        "rng_state", state,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
         parallel_state.get_context_parallel_world_size()),
        (pp, tp, cp),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(module):
    """The GPTModel inside a DDP wrapper: checkpoint keys must not depend on the wrapper."""
    return getattr(module, "module", module)


def _sharded_state(model, optimizer, scheduler, *, is_loading: bool, with_rng: bool = True,
                   optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT) -> dict:
    model_sd = _unwrap(model[0]).sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        if is_loading:
            _materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
        if with_rng:
            state["rng_state"] = _rng_state()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state tensors yet; the distributed optimizer needs them to build
    the sharded state dict it loads into (they are overwritten by the load)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model: list,
    *,
    model_spec: ModelSpec,
    optimizer=None,
    scheduler=None,
    train_state: Optional[dict] = None,
    keep_last: int = 0,
    optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = Path(save_dir)
    final = iteration_dir(root, iteration)
    partial = root / f".{final.name}.partial"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, is_loading=False,
                                           optimizer_format=optimizer_format), str(partial))
    _barrier()
    if rank0:
        meta = {
            "iteration": iteration,
            "model_spec": dataclasses.asdict(model_spec),
            "has_optimizer": optimizer is not None,
            "optimizer_format": optimizer_format if optimizer is not None else None,
            "parallel": {**_model_parallel_layout(), "data": parallel_state.get_data_parallel_world_size()},
            "train_state": train_state or {},
        }
        (partial / META_FILE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # re-saving an iteration (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / LATEST_FILE, f"{iteration}\n")
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def load_checkpoint(
    load_dir: str | Path,
    model: list,
    *,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
    strict: bool = True,
) -> dict:
    """Load into ``model`` (and optimizer/scheduler/RNG when given and present); collective.

    Returns the stored train state (empty for a model-only checkpoint).
    """
    mcore_fixes.apply()
    meta = read_checkpoint_meta(load_dir, iteration)
    ckpt = iteration_dir(load_dir, meta["iteration"])
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"{ckpt} is model-only (no optimizer state): use it as checkpoint.init_from")
    # RNG states are per (PP, TP, CP) rank: they only carry over to the same layout. They drive
    # dropout alone, so a resharded resume continues with freshly seeded generators.
    same_layout = all(meta["parallel"][k] == v for k, v in _model_parallel_layout().items())
    optimizer_format = meta.get("optimizer_format") or DEFAULT_OPTIMIZER_FORMAT
    if optimizer is not None and optimizer_format == "dp_reshardable" and not same_layout:
        raise CheckpointError(
            f"{ckpt} holds dp_reshardable optimizer state saved at {meta['parallel']}; it resumes only at "
            f"the same TP/PP/CP ({_model_parallel_layout()} now). Resume at that layout, or start from its "
            "weights alone with checkpoint.init_from (the optimizer state is then fresh)")
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, scheduler, is_loading=True, with_rng=same_layout,
                       optimizer_format=optimizer_format), str(ckpt))
    _unwrap(model[0]).load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        with torch.no_grad():  # megatron's dp_reshardable path copies into parameter views
            optimizer.load_state_dict(state["optimizer"])
        if same_layout:
            _set_rng_state(state["rng_state"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return meta.get("train_state", {})


def _model_parallel_layout() -> dict:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "context": parallel_state.get_context_parallel_world_size(),
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
