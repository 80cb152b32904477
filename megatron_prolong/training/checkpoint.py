"""Checkpoints: megatron-core dist_checkpointing (resharded on load), written then marked complete.

The folder layout is ``megatron_prolong.checkpoint_layout``. A save goes to ``.iter_N.partial``
and is renamed only after every rank finished writing, then ``latest_checkpointed_iteration.txt``
is replaced atomically, so a crash or pre-emption mid-save never leaves something that looks like
a checkpoint. A model-only checkpoint (no optimizer; what the Hugging Face converter writes)
initialises a run.

``save_checkpoint`` / ``load_checkpoint`` are the collective mechanics; ``Checkpointer`` owns a
run's policy (when to save, keep-last, optimizer format, what to restore).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from .. import platform
from ..checkpoint_layout import (LATEST_FILE, META_FILE, CheckpointError, encode_model_spec,  # noqa: F401
                                 iteration_dir, latest_iteration, list_iterations, model_spec_from_meta,
                                 partial_dir, read_checkpoint_meta, write_atomic, write_checkpoint_meta)
from ..models.registry import ModelSpec
from . import optimizer_state

DEFAULT_OPTIMIZER_FORMAT = optimizer_state.FORMAT
LEGACY_OPTIMIZER_FORMAT = "fully_reshardable"
PLAIN_OPTIMIZER_FORMAT = "plain"
"""Recorded for runs with ``parallel.distributed_optimizer=false``."""
"""What checkpoints written before the format was recorded hold."""


def _rng_state() -> ShardedObject:
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if platform.is_cuda() else None,
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
    if state["cuda"] is not None and platform.is_cuda():
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
        if optimizer_format == optimizer_state.FORMAT:
            state["optimizer"] = optimizer_state.sharded_state_dict(optimizer, model_sd, is_loading=is_loading)
        else:
            state["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": optimizer_format})
        if with_rng:
            state["rng_state"] = _rng_state()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def stored_optimizer_format(optimizer, requested: str) -> str:
    """The format actually written: the requested one for megatron's distributed optimizer;
    megatron's own per-parameter state for the plain (non-distributed) optimizer, which has no
    formats to choose from."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return requested if all(hasattr(sub, "gbuf_ranges") for sub in subs) else PLAIN_OPTIMIZER_FORMAT


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
    partial = partial_dir(root, iteration)
    if optimizer is not None:
        optimizer_format = stored_optimizer_format(optimizer, optimizer_format)
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
            "model_spec": encode_model_spec(model_spec),
            "has_optimizer": optimizer is not None,
            "optimizer_format": optimizer_format if optimizer is not None else None,
            "parallel": {**_model_parallel_layout(), "data": parallel_state.get_data_parallel_world_size()},
            "train_state": train_state or {},
        }
        write_checkpoint_meta(partial, meta)
        if final.exists():  # re-saving an iteration (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomic(root / LATEST_FILE, f"{iteration}\n")
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
    meta = read_checkpoint_meta(load_dir, iteration)
    ckpt = iteration_dir(load_dir, meta["iteration"])
    if optimizer is not None and not meta["has_optimizer"]:
        raise CheckpointError(f"{ckpt} is model-only (no optimizer state): use it as checkpoint.init_from")
    # RNG states are per (PP, TP, CP) rank: they only carry over to the same layout. They drive
    # dropout alone, so a resharded resume continues with freshly seeded generators.
    same_layout = all(meta["parallel"][k] == v for k, v in _model_parallel_layout().items())
    optimizer_format = meta.get("optimizer_format") or LEGACY_OPTIMIZER_FORMAT
    if optimizer is not None and optimizer_format == "dp_reshardable" and not same_layout:
        raise CheckpointError(
            f"{ckpt} holds dp_reshardable optimizer state saved at {meta['parallel']}; it resumes only at "
            f"the same TP/PP/CP ({_model_parallel_layout()} now). Resume at that layout, or start from its "
            "weights alone with checkpoint.init_from (the optimizer state is then fresh)")
    if optimizer is not None and (optimizer_format == PLAIN_OPTIMIZER_FORMAT) != (
            stored_optimizer_format(optimizer, DEFAULT_OPTIMIZER_FORMAT) == PLAIN_OPTIMIZER_FORMAT):
        raise CheckpointError(
            f"{ckpt} holds {optimizer_format} optimizer state, which does not fit this run's optimizer; set "
            "parallel.distributed_optimizer as in the run that saved it, or start from its weights alone "
            "with checkpoint.init_from")
    state = dist_checkpointing.load(
        _sharded_state(model, optimizer, scheduler, is_loading=True, with_rng=same_layout,
                       optimizer_format=optimizer_format), str(ckpt))
    _unwrap(model[0]).load_state_dict(state["model"], strict=strict)
    if optimizer is not None:
        with torch.no_grad():  # megatron's dp_reshardable path copies into parameter views
            if optimizer_format == optimizer_state.FORMAT:
                optimizer_state.load_state_dict(optimizer, state["optimizer"])
            else:
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


def _prune(root: Path, keep_last: int) -> None:
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iters[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The run's checkpoint policy
# ---------------------------------------------------------------------------------------------


@dataclass
class Restored:
    """What a run starts from."""

    kind: str = "fresh"
    """``resumed`` (everything from ``save_dir``), ``init_from`` (weights only) or ``fresh``."""
    source: Optional[str] = None
    iteration: int = 0
    consumed_samples: int = 0
    timing: dict = field(default_factory=dict)
    """The previous run's measured seconds per step and per save (pre-emption margin)."""

    def describe(self) -> str:
        if self.kind == "resumed":
            return (f"resumed from {self.source} at step {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")
        if self.kind == "init_from":
            return f"initialised weights from {self.source}"
        return ""


class Checkpointer:
    """Restores a run and saves it by policy: every ``save_interval`` steps, at the last step
    (``save_at_end``), and when forced (pre-emption signal, ``train.exit_at_step``)."""

    def __init__(self, cfg, run, model: list, optimizer, scheduler):
        self.cfg = cfg.checkpoint
        self.total_steps = cfg.train.steps
        self.config_dict = cfg.to_dict()
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.save_dir = self.cfg.save_dir
        self.last_save_seconds: Optional[float] = None

    def restore(self) -> Restored:
        """Resume the run in ``save_dir`` (model, optimizer, schedule, RNG, data position), or
        start from the weights of ``init_from``; collective."""
        if self.save_dir and latest_iteration(self.save_dir) is not None:
            state = load_checkpoint(self.save_dir, self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            return Restored("resumed", self.save_dir, int(state.get("iteration", 0)),
                            int(state.get("consumed_samples", 0)), dict(state.get("timing", {})))
        if self.cfg.init_from:
            load_checkpoint(self.cfg.init_from, self.model)
            # bf16 parameters: the optimizer took its fp32 main weights at construction; give it
            # the loaded ones, or its first step would write the random initialisation back.
            self.optimizer.reload_model_params()
            return Restored("init_from", self.cfg.init_from)
        return Restored()

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether ``maybe_save`` would write at ``step``."""
        if not self.save_dir:
            return False
        periodic = self.cfg.save_interval and step % self.cfg.save_interval == 0
        last = step == self.total_steps and self.cfg.save_at_end
        return bool(force or periodic or last)

    def maybe_save(self, step: int, *, consumed_samples: int, force: bool = False,
                   timing: Optional[dict] = None) -> Optional[Path]:
        """Save if the policy says so (collective: every rank calls it). Returns the folder."""
        if not self.due(step, force=force):
            return None
        t0 = time.time()
        train_state = {"iteration": step, "consumed_samples": consumed_samples, "config": self.config_dict,
                       "timing": dict(timing or {})}
        path = save_checkpoint(
            self.save_dir, step, self.model, model_spec=self.run.spec, optimizer=self.optimizer,
            scheduler=self.scheduler, keep_last=self.cfg.keep_last, optimizer_format=self.cfg.optimizer_format,
            train_state=train_state)
        self.last_save_seconds = time.time() - t0
        if self.run.is_rank0:  # the save's own duration, for the next launch's pre-emption advice
            meta = read_checkpoint_meta(self.save_dir, step)
            meta["train_state"]["timing"]["save_seconds"] = self.last_save_seconds
            write_checkpoint_meta(path, meta)
        return path
