"""One optimizer step: micro-batch iterator -> megatron schedule -> optimizer + LR step.

A step whose loss or gradient norm is not finite is not applied: ``guarded_optimizer_step`` is
megatron's ``ChainedOptimizer.step`` with a check between the gradient norm and the update, and
every rank takes the same decision (one all-reduce), so no rank applies a step another skips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..parallel.cross_entropy import masked_loss_sum


@dataclass
class StepResult:
    loss: float
    """Token-averaged loss over the global batch (every rank gets the same value)."""
    loss_tokens: int
    grad_norm: float
    lr: float
    skipped: bool
    skip_reason: Optional[str] = None
    """Why the step was not applied (non-finite loss / gradient norm), None when it was."""


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of masked token losses, loss-token count, logging pair). The schedule sums these over
    micro-batches and ``finalize_model_grads`` divides gradients by the tokens of the whole global
    batch across DP x CP: the loss is token-averaged, not an average of per-rank means."""
    loss_sum, num_tokens = masked_loss_sum(output_tensor, loss_mask)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"],
        labels=batch["labels"], packed_seq_params=batch["packed_seq_params"],
    )
    if batch.get("inject_nan_loss"):  # training.faults: a poisoned batch (tests only)
        output = output * float("nan")
    return output, partial(loss_func, batch["loss_mask"])


def train_step(model: list, optimizer, scheduler, micro_batches: Iterator[dict], *,
               num_microbatches: int, seq_length: int, micro_batch_size: int,
               global_batch_size: int, device: torch.device) -> StepResult:
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batches,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss_sum, tokens = _global_loss(reduced, device)
    loss = loss_sum / max(tokens, 1.0)
    grad_norm, skip_reason = guarded_optimizer_step(optimizer, loss, device)
    if skip_reason is None:
        scheduler.step(increment=global_batch_size)
    return StepResult(
        loss=loss, loss_tokens=int(tokens), grad_norm=grad_norm,
        lr=optimizer.param_groups[0]["lr"], skipped=skip_reason is not None, skip_reason=skip_reason,
    )


def guarded_optimizer_step(optimizer, loss: float, device: torch.device) -> tuple[float, Optional[str]]:
    """Apply the step unless the loss or the gradient norm is not finite on any rank.

    Returns ``(grad norm, None)`` when applied, ``(grad norm, reason)`` when skipped: then the
    weights, the optimizer state (moments, step counts) and the fp32 main weights are untouched;
    the gradients are discarded by the next step's zeroing. The order of calls is megatron's
    ``ChainedOptimizer.step`` (prepare grads, total norm, clip by it, inner step), so an applied
    step is the same computation. Why not megatron's own guards: the NaN check of its DDP config
    (``check_for_nan_in_grad``) raises instead of skipping, and its skip on inf/nan
    (``prepare_grads``) exists only with an fp16 loss scaler; bf16 and fp32 runs would apply a
    NaN step.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    # True only with an fp16 grad scaler, which has then already lowered its scale.
    overflow = optimizer.prepare_grads()
    grad_norm = float("nan") if overflow else float(optimizer.get_grad_norm())
    reason = None
    if overflow:
        reason = "gradient overflow (fp16 loss scale lowered)"
    elif not math.isfinite(loss):
        reason = f"non-finite loss ({loss})"
    elif not math.isfinite(grad_norm):
        reason = f"non-finite gradient norm ({grad_norm})"
    if any_rank(reason is not None, device):
        return grad_norm, reason or "non-finite values on another rank"
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False) or sub.config.clip_grad <= 0.0:
            continue
        params = sub.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()
    return grad_norm, None


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: true on every rank when ``flag`` is true on any rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _global_loss(reduced: list[dict], device: torch.device) -> tuple[float, float]:
    """Sum the (loss, tokens) pairs over micro-batches and DP x CP; share with every PP stage."""
    pair = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            pair += item["lm loss"].detach().double()
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(pair, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = pair.tolist()  # the step's one read of the loss (a host sync)
    return loss_sum, tokens
