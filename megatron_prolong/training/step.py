"""One optimizer step: micro-batch iterator -> megatron schedule -> optimizer + LR step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterator

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
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=global_batch_size)
    loss_sum, tokens = _global_loss(reduced, device)
    return StepResult(
        loss=loss_sum / max(tokens, 1.0), loss_tokens=int(tokens),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=optimizer.param_groups[0]["lr"], skipped=not ok,
    )


def _global_loss(reduced: list[dict], device: torch.device) -> tuple[float, float]:
    """Sum the (loss, tokens) pairs over micro-batches and DP x CP; share with every PP stage."""
    pair = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        for item in reduced:
            pair += item["lm loss"].detach().double().cpu()
    pair = pair.to(device)
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(pair, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(pair, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return float(pair[0]), float(pair[1])
