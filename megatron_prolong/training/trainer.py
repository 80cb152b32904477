"""The training loop: resolve the run, build, restore, then step, log, checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ..config import Config
from ..data import build_train_dataset
from ..eval.periodic import build_periodic_evaluator
from ..parallel.state import peer_failures_reported
from . import faults
from .checkpoint import Checkpointer, Restored, latest_iteration
from .data_iter import micro_batches, rank_micro_batch_indices
from .guard import StepGuard
from .progress import ProgressLogger
from .run import Run, resolve_run
from .setup import build_model, build_optimizer, build_scheduler
from .signals import PREEMPTED, PreemptionSignal, write_exit_status
from .step import train_step


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Global token-averaged loss of every step this call ran, by step number (1-based)."""
    iteration: int = 0
    consumed_samples: int = 0
    interrupted: bool = False
    stopped_by: Optional[str] = None
    """Why the loop ended before ``train.steps`` (``PREEMPTED`` or ``"train.exit_at_step"``)."""
    evaluations: dict = field(default_factory=dict)
    """Validation results (``eval.ValidationResult``) by the step they followed."""


def train(cfg: Config) -> TrainResult:
    t = cfg.train
    run = resolve_run(cfg)
    model = build_model(cfg, run)
    optimizer = build_optimizer(cfg, run, model)
    scheduler = build_scheduler(cfg, optimizer)
    log = ProgressLogger(t.steps, 0, run.logging_rank, cfg.logging.tensorboard_dir, cfg.logging.interval,
                         world_size=run.world_size, cuda_memory=run.on_cuda)
    dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed, vocab_size=run.spec.vocab_size,
                                  num_samples=t.steps * t.global_batch_size, log=log.info)
    checkpointer = Checkpointer(cfg, run, model, optimizer, scheduler, log=log.info)
    restored = checkpointer.restore()
    log.start = restored.iteration
    _log_start(log, cfg, run, restored)
    evaluator = build_periodic_evaluator(cfg, run, model, log)  # None without validation data
    guard = StepGuard(max_bad_steps=t.max_bad_steps, global_batch_size=t.global_batch_size, log=log,
                      spike_factor=t.loss_spike_factor, spike_window=t.loss_spike_window,
                      consecutive_skipped=restored.consecutive_skipped)

    order = batch_order(cfg, dataset)
    result = TrainResult(iteration=restored.iteration, consumed_samples=restored.consumed_samples)
    advice = _LeadAdvice(log, cfg.checkpoint.exit_on_signal, already_given=bool(restored.timing))
    # Leaving the block waits for a background save; an exception abandons it, incomplete.
    with PreemptionSignal(enabled=cfg.checkpoint.exit_on_signal) as preempt, \
            peer_failures_reported(t.collective_timeout_minutes), checkpointer.saving():
        while result.iteration < t.steps:
            out = one_step(cfg, run, model, optimizer, scheduler, dataset, order, result)
            log.step(result.iteration, out.loss, out.lr, out.grad_norm, t.global_batch_size * t.seq_length,
                     out.skipped)
            guard.record(result.iteration, out, consumed_before=result.consumed_samples - t.global_batch_size)
            if guard.exhausted:
                checkpointer.wait()  # a save of an earlier, applied step is still worth completing
                raise guard.stop_error(latest_iteration(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None)
            if evaluator is not None and evaluator.due(result.iteration):
                result.evaluations[result.iteration] = evaluator.evaluate(result.iteration)
                log.skip_pause()

            stop = PREEMPTED if preempt.any_rank_received(run.device) else \
                "train.exit_at_step" if result.iteration == t.exit_at_step else None
            checkpointer.poll()
            if checkpointer.maybe_save(result.iteration, consumed_samples=result.consumed_samples, force=bool(stop),
                                       timing={"step_seconds": log.typical_step_seconds()}, skipped=out.skipped,
                                       consecutive_skipped=guard.consecutive_skipped) is not None:
                log.skip_pause()
            advice.after_save(log.typical_step_seconds(), checkpointer.last_save_seconds)
            if stop:
                then = "relaunch to resume" if cfg.checkpoint.save_dir else "no checkpoint.save_dir, so nothing was saved"
                log.info(f"{stop}: stopped after step {result.iteration}; {then}")
                result.interrupted, result.stopped_by = True, stop
                break
    log.close()
    write_exit_status(preempted=result.stopped_by == PREEMPTED, iteration=result.iteration, steps=t.steps)
    return result


def one_step(cfg: Config, run: Run, model, optimizer, scheduler, dataset, order, result: TrainResult):
    """The next global batch through forward, backward and the (guarded) optimizer step."""
    t = cfg.train
    batches = faults.inject(result.iteration + 1, step_batches(cfg, run, dataset, result.consumed_samples, order))
    out = train_step(
        model, optimizer, scheduler, batches,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * run.dp_size),
        # The full length: megatron's schedule divides by CP (and by TP under SP) itself.
        seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, device=run.device,
    )
    result.iteration += 1
    result.consumed_samples += t.global_batch_size
    result.losses[result.iteration] = out.loss
    return out


def step_batches(cfg: Config, run: Run, dataset, consumed_samples: int,
                 order: Optional[Callable]) -> Iterator[dict]:
    """This rank's micro-batches of the next global batch, split for CP (and packed for TE)."""
    t, p = cfg.train, cfg.parallel
    groups = rank_micro_batch_indices(consumed_samples, t.global_batch_size, t.micro_batch_size,
                                      run.dp_rank, run.dp_size, order)
    return micro_batches(dataset, groups, device=run.device, cp_size=p.context, cp_rank=run.cp_rank,
                         use_te=run.use_te, tp_size=p.tensor, sequence_parallel=p.sequence_parallel)


def batch_order(cfg: Config, dataset) -> Optional[Callable]:
    if not cfg.data.length_sorted:
        return None
    from ..data import order_global_batch

    return lambda idx: order_global_batch(dataset, idx)


class _LeadAdvice:
    """Prints the pre-emption lead once per launch, as soon as a step and a save were timed."""

    def __init__(self, log, enabled: bool, already_given: bool):
        self.log, self.pending = log, enabled and not already_given

    def after_save(self, step_seconds: Optional[float], save_seconds: Optional[float]) -> None:
        if self.pending and save_seconds is not None:
            self.log.info(signal_lead_advice(step_seconds, save_seconds))
            self.pending = False


def signal_lead_advice(step_seconds: Optional[float], save_seconds: Optional[float]) -> str:
    """How long before a time limit the pre-emption signal must come: a rank may have just started
    a step, then all save together; 1.5x that plus a minute for the exit and the requeue."""
    if step_seconds is None or save_seconds is None:
        return "pre-emption: no step/save time measured yet"
    lead = int(math.ceil((1.5 * (step_seconds + save_seconds) + 60) / 30.0) * 30)
    return (f"pre-emption: a step takes {step_seconds:.0f} s and a save {save_seconds:.0f} s here; signal at "
            f"least {lead} s before the time limit (sbatch --signal=B:USR1@{lead})")


def _log_start(log: ProgressLogger, cfg: Config, run: Run, restored: Restored) -> None:
    p, t, d, spec = cfg.parallel, cfg.train, run.decisions, run.spec
    if restored.describe():
        log.info(restored.describe())
    for line in run.spec_origin.lines(spec):
        log.info(line)
    log.info(f"model {spec.name}: {spec.num_parameters() / 1e6:.1f}M parameters, rotary base {spec.rotary_base:g} | "
             f"TP {p.tensor} PP {p.pipeline} CP {p.context} DP {run.dp_size} | global batch {t.global_batch_size} "
             f"x {t.seq_length} tokens | {t.steps} steps | device {run.device.type}, "
             f"{'bf16' if d.bf16 else 'fp32'}, attention {d.attention_backend}"
             + (f", CP comm {d.cp_comm_type}" if p.context > 1 else ""))
    if restored.timing and cfg.checkpoint.exit_on_signal:
        log.info(signal_lead_advice(restored.timing.get("step_seconds"), restored.timing.get("save_seconds")))
