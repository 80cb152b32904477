"""One training step of one rank of the real job, on fake tensors: the trainer's own code.

``dry_run(cfg, world_size=64, rank=0)`` installs the dry-run platform (``platform/dry_run.py``:
fake process group of ``world_size`` ranks, ``meta`` for CUDA, FakeTensorMode), then runs what
``training/trainer.py`` runs for a step: ``resolve_run`` -> ``build_model`` /
``build_optimizer`` / ``build_scheduler`` -> ``one_step`` (``step_batches``: the batch of this
rank, split for CP, then megatron's schedule, the guarded optimizer step). Data comes from the
recipe's dataset (real values; the mock dataset when the recipe's files are absent, see
``tools/dry_run.load_for_dry_run``); the batch is moved to the device and prepared there like on
a GPU. The
TE path's batch preparation (THD packing, data-dependent) runs on the same samples with real
values, as a check that it runs at the recipe's length.

Observed (``observe.StepObserver`` and torch's ``FlopCounterMode``): memory by category, FLOPs,
collectives by group, GEMM dtypes, host syncs. A process simulates one world (of one size, as
one rank); several dry runs of it may follow each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from dataclasses import dataclass, field

import torch

from ..config import Config
from .observe import StepObserver, megatron_groups

DRYRUN_OVERRIDES = ["checkpoint.init_from=null", "checkpoint.save_dir=null", "checkpoint.save_interval=0",
                    "logging.tensorboard_dir=null", "eval.interval=0"]
"""What a dry run changes in any recipe: nothing is read or written (no checkpoint, no logs)."""

MOCK_DATA_OVERRIDES = ["data.mock=true", "data.mixture=null", "data.data_prefix=null", "data.blend=null",
                       "data.valid_blend=null", "data.valid_data_prefix=null"]
"""Where the recipe's data is not on this machine: synthetic packed samples of the same length."""


@dataclass
class DryRunResult:
    """What one dry-run step measured (``report.py`` turns it into tables)."""

    cfg: Config
    world_size: int
    rank: int
    coords: dict
    """tp / pp / cp / dp rank and sizes of the simulated rank."""
    decisions: dict
    spec: object
    micro_batches: int
    memory: dict
    """Bytes: ``static`` (weights, grads, optimizer after the step), ``peak`` / ``peak_loss_head`` /
    ``peak_layer_backward`` (total and by category)."""
    flops: dict
    collectives: list
    """(group, op, calls, bytes) per step."""
    gemm_flops: dict
    host_syncs: dict
    samples: list
    """Document lengths of this rank's samples (analytic FLOPs)."""
    te_batch: dict
    step: dict
    seconds: dict = field(default_factory=dict)
    peak_rss_gib: float = 0.0


def pick_rank(cfg: Config, world_size: int, rank: str | int) -> int:
    """``rank``: an integer, or ``last``: the first rank of the last pipeline stage (the one that
    holds the output layer and the loss)."""
    if str(rank) == "last":
        # megatron's rank order is tp-cp-(ep)-dp-pp: the pipeline stage varies slowest.
        return (cfg.parallel.pipeline - 1) * (world_size // cfg.parallel.pipeline)
    return int(rank)


def dry_run(cfg: Config, world_size: int, rank: int | str = 0, log=print) -> DryRunResult:
    """Run one step of rank ``rank`` of a ``world_size``-GPU job on fake tensors (module doc)."""
    from ..platform import dry_run as platform_dry_run
    from ..training.trainer import TrainResult, one_step

    rank = pick_rank(cfg, world_size, rank)
    cfg.check_world(world_size)
    t0 = time.time()
    platform_dry_run.install(world_size, rank)
    fake, observer = platform_dry_run.fake_mode(), StepObserver(bf16=False)
    run, model, optimizer, scheduler = _build(cfg, fake, observer)
    seconds = {"build": time.time() - t0}
    log(f"dry run: rank {rank} of {world_size} (TP {cfg.parallel.tensor} PP {cfg.parallel.pipeline} "
        f"CP {cfg.parallel.context} DP {run.dp_size}; this rank tp {run.tp_rank} pp {run.pp_rank} cp {run.cp_rank} "
        f"dp {run.dp_rank}), {run.spec.name}, built in {seconds['build']:.0f} s")
    dataset, order, samples = _data(cfg, run)
    te_batch = _te_batch_preparation(cfg, run, dataset, order)

    t1 = time.time()
    observer.flop_counter = flop_counter = _flop_counter()
    with fake, flop_counter, observer, _observed_step(observer, model, optimizer):
        observer.phase = "step"
        try:
            out = one_step(cfg, run, model, optimizer, scheduler, dataset, order, TrainResult())
        except Exception as e:
            if observer.host_syncs:  # a check on values may have failed on a made-up one
                e.add_note("dry run: device values read on the host so far (answered 0 / False, there are no "
                           "values): " + ", ".join(observer.host_syncs))
            raise
    seconds["step"] = time.time() - t1
    t = cfg.train
    return DryRunResult(
        cfg=cfg, world_size=world_size, rank=rank,
        coords=dict(tp=run.tp_rank, pp=run.pp_rank, cp=run.cp_rank, dp=run.dp_rank, dp_size=run.dp_size,
                    first_stage=run.is_first_stage, last_stage=run.is_last_stage),
        decisions=dataclasses.asdict(run.decisions), spec=run.spec,
        micro_batches=t.global_batch_size // (t.micro_batch_size * run.dp_size),
        memory=_memory(observer), flops=_flops(flop_counter), collectives=_collectives(observer),
        gemm_flops=dict(observer.gemm_flops), host_syncs=dict(observer.host_syncs), samples=samples,
        te_batch=te_batch, step=dict(skipped=out.skipped, skip_reason=out.skip_reason, lr=out.lr),
        seconds=seconds, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    )


def _build(cfg: Config, fake, observer: StepObserver):
    """The run record, model, optimizer and schedule, as the trainer builds them, observed."""
    from ..training.run import resolve_run
    from ..training.setup import build_model, build_optimizer, build_scheduler

    observer.phase = "weights"
    with fake, observer:
        run = resolve_run(cfg)
        observer.bf16 = run.bf16
        observer.name_groups(megatron_groups())
        with torch.device(run.device):  # what the model makes without a device (the GPU run moves it there)
            model = build_model(cfg, run)
        observer.recategorise([b.grad_data for chunk in model for b in chunk.buffers + chunk.expert_parallel_buffers],
                              "grads")
        observer.phase = "optimizer"
        optimizer = build_optimizer(cfg, run, model)
        scheduler = build_scheduler(cfg, optimizer)
    return run, model, optimizer, scheduler


def _flop_counter():
    """torch's FlopCounterMode, counting globally (its per-module attribution, ModuleTracker's
    backward hooks on module inputs and outputs, keeps a micro-batch's tensors alive into the
    next one), with the in-place GEMMs and flex_attention counted too."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    from .observe import IN_PLACE_GEMMS

    _count_flex_attention()
    counter = FlopCounterMode(display=False, custom_mapping={
        op: flop_registry[like] for op, like in IN_PLACE_GEMMS.items()})
    counter.mod_tracker = _GlobalOnly()
    return counter


@contextlib.contextmanager
def _observed_step(observer: StepObserver, model: list, optimizer):
    """Tell the observer where the loss head, the layers and the optimizer step are (hooks on this
    model's objects, and the chunked loss's backward while the step runs)."""
    from ..parallel.cross_entropy import _ChunkedVocabParallelCE

    chunk = model[0].module
    handles = observer.watch_layers(chunk.decoder.layers)
    postprocess, prepare_grads = chunk._postprocess, optimizer.prepare_grads
    loss_backward = _ChunkedVocabParallelCE.backward

    def observed_postprocess(*args, **kwargs):
        with observer.loss_head():
            return postprocess(*args, **kwargs)

    def observed_loss_backward(ctx, *grads):
        with observer.loss_head():
            return loss_backward(ctx, *grads)

    def observed_prepare_grads(*args, **kwargs):
        observer.phase = "optimizer step"
        return prepare_grads(*args, **kwargs)

    chunk._postprocess, optimizer.prepare_grads = observed_postprocess, observed_prepare_grads
    _ChunkedVocabParallelCE.backward = staticmethod(observed_loss_backward)
    try:
        yield
    finally:
        _ChunkedVocabParallelCE.backward = staticmethod(loss_backward)
        del chunk._postprocess, optimizer.prepare_grads
        for h in handles:
            h.remove()


class _GlobalOnly:
    """A ModuleTracker stand-in: every FLOP counted under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_FLEX_COUNTED = []


def _count_flex_attention() -> None:
    """Let FlopCounterMode count flex_attention run eagerly: torch registers its FLOP formulas
    (dense: every query against every key) but gives the counting mode no rule for the
    higher-order ops outside ``torch.compile``."""
    if _FLEX_COUNTED:
        return
    from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward
    from torch.utils.flop_counter import _FlopCounterMode

    for hop in (flex_attention, flex_attention_backward):
        def count(mode, *args, _hop=hop, **kwargs):
            out = _hop(*args, **kwargs)
            return mode.counter._count_flops(_hop, out, args, kwargs)

        hop.py_impl(_FlopCounterMode)(count)
    _FLEX_COUNTED.append(True)


def _data(cfg: Config, run):
    """The run's dataset and batch order (real values), and the document lengths of the samples
    this rank trains on in step 1."""
    from ..data import build_train_dataset
    from ..training.data_iter import rank_micro_batch_indices
    from ..training.trainer import batch_order

    t = cfg.train
    dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed, vocab_size=run.spec.vocab_size,
                                  num_samples=t.steps * t.global_batch_size, log=lambda *_: None)
    order = batch_order(cfg, dataset)
    groups = rank_micro_batch_indices(0, t.global_batch_size, t.micro_batch_size, run.dp_rank, run.dp_size, order)
    samples = []
    for group in groups:
        for i in group:
            cu = dataset[i]["cu_seqlens"]
            samples.append([int(b - a) for a, b in zip(cu[:-1], cu[1:])])
    return dataset, order, samples


def _te_batch_preparation(cfg: Config, run, dataset, order) -> dict:
    """The TE path's batch preparation (THD packing, each document padded to 2 x CP, this CP
    rank's share) of this rank's step-1 samples, with real values on the CPU (its output sizes
    depend on the documents)."""
    from ..training.trainer import step_batches

    cpu_run = dataclasses.replace(run, device=torch.device("cpu"),
                                  decisions=dataclasses.replace(run.decisions, use_te=True))
    t0 = time.time()
    tokens = [int(b["tokens"].shape[1]) for b in step_batches(cfg, cpu_run, dataset, 0, order)]
    return {"micro_batches": len(tokens), "local_tokens": tokens, "seconds": time.time() - t0}


def _memory(observer: StepObserver) -> dict:
    """Bytes: after the step (``static``: weights, grads, optimizer state), and at each peak by
    category, with what the step made and kept (buffers, caches) as ``buffers``."""
    live = observer.live
    static = {"weights": live["weights"], "grads": live["grads"],
              "optimizer": live["optimizer"] + live["optimizer step"]}
    out = {"static": static, "build_peak": observer.peak_build.total}
    for name in ("peak", "peak_loss_head", "peak_layer_backward"):
        peak = getattr(observer, name)
        by_category = {c: n for c, n in peak.by_category.items() if n}
        for category, n in observer.buffers_at(peak).items():
            by_category[category] -= n
            by_category["buffers"] = by_category.get("buffers", 0) + n
        out[name] = {"total": peak.total, "by_category": by_category}
    return out


def _flops(counter) -> dict:
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    attention = sum(n for op, n in by_op.items() if "attention" in op)
    return {"total": int(counter.get_total_flops()), "by_op": by_op, "attention": attention,
            "gemm": int(counter.get_total_flops()) - attention}


def _collectives(observer: StepObserver) -> list:
    return sorted(((g, op, c.calls, c.bytes) for (g, op), c in observer.collectives.items()),
                  key=lambda r: (r[0], r[1]))
