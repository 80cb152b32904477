"""Checkpoints: megatron-core dist_checkpointing (resharded on load), written then marked complete.

The folder layout is ``megatron_prolong.checkpoint_layout``. A save goes to ``.iter_N.partial``
and is renamed only after every rank finished writing, then ``latest_checkpointed_iteration.txt``
is replaced atomically, so a crash or pre-emption mid-save never leaves something that looks like
a checkpoint. A model-only checkpoint (no optimizer; what the Hugging Face converter writes)
initialises a run.

``save_checkpoint`` / ``load_checkpoint`` are the collective mechanics (``begin_save`` plans a save
whose write can run in a forked process; its finalisation renames it once every rank has
written); ``Checkpointer`` owns a run's policy (when to save, background or not, keep-last,
optimizer format, never from non-finite state, what to restore). A damaged checkpoint fails on
load naming its file (``checkpoint_integrity``). See docs/fault_tolerance.md.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial as partial_fn
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import FileSystemReader
from torch.futures import Future

from .. import platform
from ..checkpoint_layout import (LATEST_FILE, META_FILE, CheckpointError, encode_model_spec,  # noqa: F401
                                 iteration_dir, latest_iteration, list_iterations, list_partials,
                                 model_spec_from_meta, partial_dir, read_checkpoint_meta, resolve_checkpoint,
                                 write_atomic, write_checkpoint_meta)
from ..models.registry import ModelSpec
from . import optimizer_state

DEFAULT_OPTIMIZER_FORMAT = optimizer_state.FORMAT
LEGACY_OPTIMIZER_FORMAT = "fully_reshardable"
"""What checkpoints written before the format was recorded hold."""
PLAIN_OPTIMIZER_FORMAT = "plain"
"""Recorded for runs with ``parallel.distributed_optimizer=false``."""


def _rng_state() -> ShardedObject:
    state = platform.rng_states()
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    cp = parallel_state.get_context_parallel_rank()
    return ShardedObject(
        "rng_state", state,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
         parallel_state.get_context_parallel_world_size()),
        (pp, tp, cp),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


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


def save_checkpoint(save_dir: str | Path, iteration: int, model: list, **options) -> Path:
    """Collective: every rank calls it; written when it returns. Takes ``begin_save``'s arguments
    (``model_spec``, ``optimizer``, ``scheduler``, ``train_state``, ``keep_last``,
    ``optimizer_format``). Returns the final checkpoint directory."""
    save = begin_save(save_dir, iteration, model, **options)
    save.request.execute_sync()  # the write, a barrier, then the finalisation
    return save.final


@dataclass
class PendingSave:
    """A save whose tensors are being written; its request's finalisation (collective, after
    every rank's writer finished) writes the metadata, renames ``.partial`` and moves ``latest``."""

    iteration: int
    final: Path
    request: object
    """megatron's ``AsyncRequest``: ``async_fn`` writes this rank's files, ``finalize_fns`` finish."""
    started: float
    stall_seconds: float = 0.0
    """How long the caller was blocked to start the save (planning, staging); set by the caller."""
    background: bool = False


def begin_save(
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
    forked_writer: bool = False,
) -> PendingSave:
    """Collective: plan the save into ``.iter_N.partial`` and return it, not yet written.

    Write it with ``request.execute_sync()`` or, with ``forked_writer``, by scheduling the request
    on megatron's ``AsyncCallsQueue`` (a forked process writes; schedule it before the next
    optimizer step). What is written is the state at that point: megatron's ``preload_fn`` copies
    GPU tensors to host memory when the request is scheduled, and a forked writer sees CPU tensors
    as they were at the fork.
    """
    started = time.time()
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
    meta = {
        "iteration": iteration,
        "model_spec": encode_model_spec(model_spec),
        "has_optimizer": optimizer is not None,
        "optimizer_format": optimizer_format if optimizer is not None else None,
        "parallel": {**_model_parallel_layout(), "data": parallel_state.get_data_parallel_world_size()},
        "train_state": train_state or {},
    }
    request = dist_checkpointing.save(
        _sharded_state(model, optimizer, scheduler, is_loading=False, optimizer_format=optimizer_format),
        str(partial), async_sharded_save=True)
    if request.async_fn is not None:
        request = request._replace(async_fn=partial_fn(_write_files, request.async_fn, iteration,
                                                       forked_writer))
    # megatron's own finalisation (the DCP index, metadata.json, a barrier) comes first.
    request.add_finalize_fn(partial_fn(_finalize_save, root, partial, final, meta, keep_last, started))
    return PendingSave(iteration, final, request, started)


def _write_files(write_fn, iteration: int, forked: bool, *args, **kwargs) -> None:
    """Write this rank's files: in a forked writer process (background save) or in the trainer."""
    from .faults import before_write

    from ..lifeline import exit_with_parent

    if forked:
        # The trainer's intra-op thread pool did not survive the fork (OpenMP is not fork-safe),
        # and a writer must not outlive a trainer that was killed.
        torch.set_num_threads(1)
        exit_with_parent()
    _file_writers_die_with_their_parent()
    before_write(iteration)
    write_fn(*args, **kwargs)


def _file_writers_die_with_their_parent() -> None:
    """megatron forks one process per file (``FileSystemWriterAsync.write_preloaded_data``); if
    their parent is killed they would stay, blocked on a results queue nobody reads. Idempotent."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from ..lifeline import exit_with_parent

    original = FileSystemWriterAsync.__dict__.get("write_preloaded_data")
    if not isinstance(original, staticmethod) or getattr(original.__func__, "with_lifeline", False):
        return

    def write_preloaded_data(*args, **kwargs):
        exit_with_parent()
        return original.__func__(*args, **kwargs)

    write_preloaded_data.with_lifeline = True
    FileSystemWriterAsync.write_preloaded_data = staticmethod(write_preloaded_data)


def _finalize_save(root: Path, partial: Path, final: Path, meta: dict, keep_last: int, started: float) -> None:
    """Collective, once every rank's files are written: complete the checkpoint, move ``latest``."""
    _barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta["train_state"].setdefault("timing", {})["save_seconds"] = time.time() - started
        write_checkpoint_meta(partial, meta)
        if final.exists():  # re-saving an iteration (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_atomic(root / LATEST_FILE, f"{meta['iteration']}\n")
        _remove_stale_partials(root, below=meta["iteration"])
        if keep_last:
            _prune(root, keep_last)
    _barrier()


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
    _refuse_damaged_files(ckpt)
    with _unreadable_records_named(ckpt):
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
            platform.set_rng_states(state["rng_state"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return meta.get("train_state", {})


def _refuse_damaged_files(ckpt: Path) -> None:
    """Every rank, before any collective read: missing or truncated files fail on all ranks alike."""
    from .checkpoint_integrity import storage_problems

    problems = storage_problems(ckpt)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {'; '.join(problems[:5])}. "
                              f"{_damaged_advice(ckpt)}")


def _damaged_advice(ckpt: Path) -> str:
    root = ckpt.parent
    others = [i for i in list_iterations(root) if iteration_dir(root, i) != ckpt]
    earlier = f"complete iterations there: {others}" if others else "there is no other complete iteration"
    return (f"Inspect it with `python tools/checkpoint_info.py {root} --verify`; to resume from an earlier "
            f"iteration write its number into {root / LATEST_FILE} ({earlier})")


@contextmanager
def _unreadable_records_named(ckpt: Path):
    """While megatron loads ``ckpt``: a record that fails to read raises a CheckpointError naming
    its file (DCP's reader reads file by file but reports a bare unpickling error), and DCP's
    per-rank failure report is unwrapped to that message on every rank."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    original = torch_strategy._get_filesystem_reader

    def reader(checkpoint_dir, cache_metadata=False):
        fs_reader = original(checkpoint_dir, cache_metadata)
        if type(fs_reader).read_data is FileSystemReader.read_data:  # the local-filesystem readers
            fs_reader.read_data = partial_fn(_read_data_by_file, fs_reader)
        return fs_reader

    torch_strategy._get_filesystem_reader = reader
    try:
        yield
    except CheckpointError:
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        named = _named_read_failure(e)
        if named is None:
            raise
        raise CheckpointError(f"{named}. {_damaged_advice(ckpt)}") from e
    finally:
        torch_strategy._get_filesystem_reader = original


def _read_data_by_file(fs_reader, plan, planner):
    """``FileSystemReader.read_data``, one file at a time, naming the file that fails."""
    per_file: dict[str, list] = {}
    for item in plan.items:
        per_file.setdefault(fs_reader.storage_data[item.storage_index].relative_path, []).append(item)
    for name, items in per_file.items():
        try:
            FileSystemReader.read_data(fs_reader, dataclasses.replace(plan, items=items), planner).wait()
        except Exception as e:
            raise CheckpointError(f"{Path(fs_reader.path) / name}: a stored record cannot be read "
                                  f"({type(e).__name__}); the file is damaged") from e
    done: Future = Future()
    done.set_result(None)
    return done


def _named_read_failure(error: BaseException) -> Optional[str]:
    """The CheckpointError message inside DCP's ``CheckpointException`` (which wraps each failing
    rank's exception; the non-failing ranks get the same report), if there is one."""
    failures = getattr(error, "failures", None) or {}
    for wrapped in failures.values():
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, CheckpointError):
            return str(inner)
    cause = error.__cause__ or error.__context__
    return _named_read_failure(cause) if cause is not None and cause is not error else None


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


def _remove_stale_partials(root: Path, below: int) -> None:
    """Leftovers of interrupted saves older than a completed one can never complete."""
    for path in list_partials(root):
        number = int(path.name.split("_")[1].split(".")[0])
        if number < below and path.name.startswith("."):
            shutil.rmtree(path, ignore_errors=True)


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
    consecutive_skipped: int = 0
    """Non-finite steps skipped right before the checkpoint (they count towards max_bad_steps)."""

    def describe(self) -> str:
        if self.kind == "resumed":
            return (f"resumed from {self.source} at step {self.iteration} "
                    f"({self.consumed_samples} samples consumed)")
        if self.kind == "init_from":
            return f"initialised weights from {self.source}"
        return ""


class Checkpointer:
    """Restores a run and saves it by policy: every ``save_interval`` steps, at the last step
    (``save_at_end``), and when forced (pre-emption signal, ``train.exit_at_step``).

    With ``checkpoint.async_save`` a periodic save is written by a forked process while training
    goes on; ``poll`` (every step, on every rank) finalises it once every rank's writer is done,
    and ``wait`` blocks for it (a new save, the end of the run). Saves at the end and forced saves
    are written synchronously. One save is in flight at a time.

    Never saves non-finite weights or optimizer state; a periodic save due at a skipped
    (non-finite) step is deferred to the next applied step.
    """

    def __init__(self, cfg, run, model: list, optimizer, scheduler, log: Optional[Callable[[str], None]] = None):
        self.cfg = cfg.checkpoint
        self.total_steps = cfg.train.steps
        self.config_dict = cfg.to_dict()
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.save_dir = self.cfg.save_dir
        self.log = log or (lambda message: None)
        self.last_save_seconds: Optional[float] = None
        """Duration of the last completed save, writing included (what a save at exit costs)."""
        self.pending: Optional[PendingSave] = None
        self._async_queue = None
        self._deferred = False

    def restore(self) -> Restored:
        """Resume the run in ``save_dir`` (model, optimizer, schedule, RNG, data position), or
        start from the weights of ``init_from``; collective."""
        if self.save_dir:
            start_writer_reports()
        if self.save_dir and latest_iteration(self.save_dir) is not None:
            state = load_checkpoint(self.save_dir, self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            self._check_loaded_finite(self.save_dir)
            return Restored("resumed", self.save_dir, int(state.get("iteration", 0)),
                            int(state.get("consumed_samples", 0)), dict(state.get("timing", {})),
                            int(state.get("consecutive_skipped", 0)))
        if self.cfg.init_from:
            load_checkpoint(self.cfg.init_from, self.model)
            self._check_loaded_finite(self.cfg.init_from)
            # bf16 parameters: the optimizer took its fp32 main weights at construction; give it
            # the loaded ones, or its first step would write the random initialisation back.
            self.optimizer.reload_model_params()
            return Restored("init_from", self.cfg.init_from)
        return Restored()

    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether ``maybe_save`` would write at ``step`` (after an applied step)."""
        if not self.save_dir:
            return False
        periodic = self.cfg.save_interval and step % self.cfg.save_interval == 0
        last = step == self.total_steps and self.cfg.save_at_end
        return bool(force or periodic or last or self._deferred)

    def maybe_save(self, step: int, *, consumed_samples: int, force: bool = False,
                   timing: Optional[dict] = None, skipped: bool = False,
                   consecutive_skipped: int = 0) -> Optional[Path]:
        """Save if the policy says so (collective: every rank calls it). Returns the folder the
        checkpoint will have (complete now, or once a background save is finalised)."""
        if not self.due(step, force=force):
            return None
        final_save = force or step == self.total_steps
        if skipped and not final_save:
            # The weights are those of the last applied step, but if the streak ends the run,
            # keep_last must not have pushed out checkpoints for them: save after an applied step.
            if not self._deferred:
                self.log(f"checkpoint of step {step} deferred: the step was skipped; saving after the next "
                         "applied step")
            self._deferred = True
            return None
        self._deferred = False
        self.wait()
        self._refuse_non_finite(step)
        t0 = time.time()
        train_state = {"iteration": step, "consumed_samples": consumed_samples, "config": self.config_dict,
                       "timing": dict(timing or {}), "consecutive_skipped": consecutive_skipped}
        background = self.cfg.async_save and not final_save
        save = begin_save(
            self.save_dir, step, self.model, model_spec=self.run.spec, optimizer=self.optimizer,
            scheduler=self.scheduler, keep_last=self.cfg.keep_last, optimizer_format=self.cfg.optimizer_format,
            train_state=train_state, forked_writer=background)
        if background:
            self._queue().schedule_async_request(save.request)
            save.stall_seconds = train_state["timing"]["save_stall_seconds"] = time.time() - t0
            save.background, self.pending = True, save
            self.log(f"checkpoint {save.final}: writing in the background (training stalled "
                     f"{save.stall_seconds:.2f} s)")
        else:
            save.request.execute_sync()
            save.stall_seconds = time.time() - t0
            self._completed(save)
        return save.final

    def poll(self) -> None:
        """Collective (every rank, every step): finalise a background save all ranks have written."""
        if self.pending is not None and self._async_queue.maybe_finalize_async_calls(blocking=False):
            self._completed(self.pending)

    def wait(self) -> None:
        """Collective: block until a background save is written and finalised."""
        if self.pending is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=True)
            self._completed(self.pending)

    @contextmanager
    def saving(self):
        """Around the step loop: leaving it waits for a background save (collective); an exception
        abandons it (``abort``) and propagates."""
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.wait()

    def abort(self) -> None:
        """Local (an error path, peers may be gone): stop a background writer. Its ``.partial``
        folder is never finalised, so ``latest`` keeps pointing at the last complete save."""
        if self.pending is None:
            return
        for call in self._async_queue.async_calls:
            call.async_caller.close(abort=True)
        self._async_queue.async_calls.clear()
        self.log(f"checkpoint {self.pending.final}: background save abandoned (left incomplete)")
        self.pending = None

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # A forked writer per save (megatron's TemporalAsyncCaller): it sees the state as of
            # the fork. The persistent (spawned) worker would receive CPU tensors through shared
            # memory instead, which the training steps go on updating in place.
            self._async_queue = AsyncCallsQueue(persistent=False)
        return self._async_queue

    def _completed(self, save: PendingSave) -> None:
        self.pending = None
        self.last_save_seconds = time.time() - save.started
        if save.background:
            self.log(f"saved checkpoint {save.final} (written in {self.last_save_seconds:.1f} s; training "
                     f"stalled {save.stall_seconds:.2f} s)")
        else:
            self.log(f"saved checkpoint {save.final} ({self.last_save_seconds:.1f} s)")

    def _refuse_non_finite(self, step: int) -> None:
        """Collective: raise on every rank if any rank holds a non-finite weight or optimizer state."""
        from ..errors import TrainingStopped
        from .step import any_rank

        bad = non_finite_tensors(self.model, self.optimizer)
        if any_rank(bool(bad), self.run.device):
            where = f"on this rank: {', '.join(bad[:5])}" if bad else "on another rank"
            raise TrainingStopped(f"refusing to save step {step}: the model or optimizer state holds non-finite "
                                  f"values ({where}); the latest checkpoint is unchanged")

    def _check_loaded_finite(self, source: str) -> None:
        """Collective: a checkpoint whose values are not finite fails here, naming its files."""
        from .step import any_rank

        bad = non_finite_tensors(self.model, self.optimizer)
        if not any_rank(bool(bad), self.run.device):
            return
        ckpt, _ = resolve_checkpoint(source)
        files = _damaged_files(ckpt)
        raise CheckpointError(f"{ckpt} holds non-finite values (in {', '.join(files) or 'no single file'}; loaded "
                              f"as {', '.join(bad[:3]) or 'state of another rank'}). {_damaged_advice(ckpt)}")


def start_writer_reports() -> None:
    """Start the process megatron's checkpoint writers report their results through, now.

    megatron starts it (a spawned ``multiprocessing`` manager) inside the first save, adding
    seconds to that save's stall; nothing stops it if the trainer is killed, and a scheduler's
    SIGTERM to the whole job kills it before the trainer's pre-emption save, which then fails.
    Started here, at start-up, it ignores those signals and dies with the trainer. Idempotent."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from ..lifeline import helper_process_init

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started (or a megatron-core without this global: leave it alone)
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=helper_process_init)
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def non_finite_tensors(model: list, optimizer=None) -> list[str]:
    """This rank's parameters / optimizer state tensors that hold a NaN or an infinity."""
    named = [(name, p) for chunk in model for name, p in _unwrap(chunk).named_parameters()]
    if optimizer is not None:
        for i, sub in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
            inner = getattr(sub, "optimizer", None)
            if inner is None:
                continue
            for g, group in enumerate(inner.param_groups):
                named += [(f"optimizer {i} main param {g}.{j}", p) for j, p in enumerate(group["params"])]
            for j, state in enumerate(inner.state.values()):
                named += [(f"optimizer {i} state {j}.{k}", v) for k, v in state.items()
                          if torch.is_tensor(v) and v.is_floating_point()]
    if not named:
        return []
    # A sum is a cheap test (memory-bound; one device sync for all): a NaN or an infinity makes it
    # non-finite. So can an overflow of huge finite values, hence the exact check of those only.
    sums = torch.stack([t.detach().sum(dtype=torch.float32) for _, t in named])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]


def _damaged_files(ckpt: Path) -> list[str]:
    """Collective: the files of ``ckpt`` with unreadable or non-finite records; every rank reads a
    share of the files (one pass over the checkpoint in all)."""
    from .checkpoint_integrity import data_files, verify

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = set(data_files(ckpt)[rank::world])
    found = sorted(verify(ckpt, files=mine).bad_files)
    if world == 1:
        return found
    gathered: list = [None] * world
    dist.all_gather_object(gathered, found)
    return sorted({f for part in gathered for f in part})
