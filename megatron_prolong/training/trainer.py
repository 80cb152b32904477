"""The training loop: set up, resume, step, log, checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron.core import parallel_state

from .. import parallel
from ..config import Config, ConfigError
from ..data import build_train_dataset
from ..models.registry import ModelSpec
from ..platform import current_device
from . import checkpoint as ckpt
from .data_iter import micro_batches, rank_micro_batch_indices
from .progress import ProgressLogger
from .setup import build_model, build_optimizer, build_scheduler, check_context_parallel, use_te
from .signals import PreemptionSignal
from .step import train_step

# Fields that define the network's shapes: a checkpoint and the recipe must agree on them.
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size")


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Global token-averaged loss of every step this call ran, by step number (1-based)."""
    iteration: int = 0
    consumed_samples: int = 0
    interrupted: bool = False


def resolve_model_spec(cfg: Config) -> ModelSpec:
    """The registry spec, or the one stored with ``checkpoint.init_from`` / a resumable checkpoint,
    with the recipe's RoPE base and overrides applied on top (each ProLong stage sets its theta)."""
    spec = cfg.model.spec()
    source = None
    if cfg.checkpoint.save_dir and ckpt.latest_iteration(cfg.checkpoint.save_dir) is not None:
        source = cfg.checkpoint.save_dir
    elif cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
    if source is None:
        return spec
    stored = ckpt.model_spec_from_meta(ckpt.read_checkpoint_meta(source))
    mismatch = [f for f in _ARCH_FIELDS if getattr(stored, f) != getattr(spec, f)]
    if mismatch:
        raise ConfigError(
            f"checkpoint {source} holds a {stored.name} model that differs from model.name={cfg.model.name} in "
            f"{mismatch}; set model.name to the checkpoint's architecture")
    overrides = dict(cfg.model.overrides)
    if cfg.model.rotary_base is not None:
        overrides["rotary_base"] = float(cfg.model.rotary_base)
    return stored.replace(**overrides)


def _with_trained_context(spec: ModelSpec, seq_length: int) -> ModelSpec:
    """The spec saved with checkpoints records the longest context trained on (a 512K model's
    exported config then says 524288, not Llama-3's 8192). RoPE itself does not depend on it."""
    if seq_length > spec.max_position_embeddings:
        return spec.replace(max_position_embeddings=seq_length)
    return spec


def restore(cfg: Config, model: list, optimizer, scheduler) -> tuple[dict, str]:
    """Resume the run in ``checkpoint.save_dir`` (everything), or start from the weights of
    ``checkpoint.init_from``. Returns the train state and what was done, for the log."""
    state = {"iteration": 0, "consumed_samples": 0}
    save_dir = cfg.checkpoint.save_dir
    if save_dir and ckpt.latest_iteration(save_dir) is not None:
        state.update(ckpt.load_checkpoint(save_dir, model, optimizer=optimizer, scheduler=scheduler))
        return state, (f"resumed from {save_dir} at step {state['iteration']} "
                       f"({state['consumed_samples']} samples consumed)")
    if cfg.checkpoint.init_from:
        ckpt.load_checkpoint(cfg.checkpoint.init_from, model)
        # bf16/fp16 parameters: the optimizer took its fp32 main weights at construction; give it
        # the loaded ones, or its first step would write the random initialisation back.
        optimizer.reload_model_params()
        return state, f"initialised weights from {cfg.checkpoint.init_from}"
    return state, ""


def train(cfg: Config) -> TrainResult:
    p, t = cfg.parallel, cfg.train
    cfg.check_world(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group exists
    parallel.initialize(p.tensor, p.pipeline, p.context, device=t.device, seed=t.seed)
    device = current_device()
    spec = _with_trained_context(resolve_model_spec(cfg), t.seq_length)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    logging_rank = (parallel_state.is_pipeline_last_stage() and dp_rank == 0
                    and parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_context_parallel_rank() == 0)

    check_context_parallel(cfg, spec)
    model = build_model(cfg, spec)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    gbs, mbs = t.global_batch_size, t.micro_batch_size
    dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed,
                                  vocab_size=spec.vocab_size, num_samples=t.steps * gbs)

    log = ProgressLogger(t.steps, 0, logging_rank, cfg.logging.tensorboard_dir, cfg.logging.interval,
                         world_size=int(os.environ.get("WORLD_SIZE", "1")))
    state, how = restore(cfg, model, optimizer, scheduler)
    if how:
        log.info(how)
    log.start = state["iteration"]
    save_dir = cfg.checkpoint.save_dir
    log.info(f"model {spec.name}: {spec.num_parameters() / 1e6:.1f}M parameters, rotary base {spec.rotary_base:g} | "
             f"TP {p.tensor} PP {p.pipeline} CP {p.context} DP {dp_size} | global batch {gbs} x {t.seq_length} "
             f"tokens | {t.steps} steps | device {device.type}")

    order = None
    if getattr(cfg.data, "length_sorted", False):
        from ..data import order_global_batch

        order = lambda idx: order_global_batch(dataset, idx)  # noqa: E731
    result = TrainResult(iteration=state["iteration"], consumed_samples=state["consumed_samples"])
    te = use_te(cfg)
    with PreemptionSignal() as preempt:
        while result.iteration < t.steps:
            groups = rank_micro_batch_indices(result.consumed_samples, gbs, mbs, dp_rank, dp_size, order)
            out = train_step(
                model, optimizer, scheduler,
                micro_batches(dataset, groups, device=device, cp_size=p.context,
                              cp_rank=parallel_state.get_context_parallel_rank(), use_te=te,
                              tp_size=p.tensor, sequence_parallel=p.sequence_parallel),
                # The full length: megatron's schedule divides by CP (and by TP under SP) itself.
                num_microbatches=len(groups), seq_length=t.seq_length,
                micro_batch_size=mbs, global_batch_size=gbs,
            )
            result.iteration += 1
            result.consumed_samples += gbs
            result.losses[result.iteration] = out.loss
            log.step(result.iteration, out.loss, out.lr, out.grad_norm, gbs * t.seq_length, out.skipped)

            signalled = cfg.checkpoint.exit_on_signal and preempt.any_rank_received(device)
            stop = signalled or result.iteration == t.exit_at_step
            periodic = cfg.checkpoint.save_interval and result.iteration % cfg.checkpoint.save_interval == 0
            last = result.iteration == t.steps and cfg.checkpoint.save_at_end
            if save_dir and (stop or periodic or last):
                path = ckpt.save_checkpoint(
                    save_dir, result.iteration, model, model_spec=spec, optimizer=optimizer, scheduler=scheduler,
                    train_state={"iteration": result.iteration, "consumed_samples": result.consumed_samples,
                                 "config": cfg.to_dict()},
                    keep_last=cfg.checkpoint.keep_last, optimizer_format=cfg.checkpoint.optimizer_format)
                log.info(f"saved checkpoint {path}")
                log.skip_pause()
            if stop:
                why = "pre-emption signal" if signalled else "train.exit_at_step"
                then = "relaunch to resume" if save_dir else "no checkpoint.save_dir, so nothing was saved"
                log.info(f"{why}: stopped after step {result.iteration}; {then}")
                result.interrupted = True
                break
    log.close()
    return result
