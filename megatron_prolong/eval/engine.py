"""Forward-only scoring through the training path, at any TP / PP / CP / DP layout.

``ForwardScorer.score(samples)`` runs samples (the dataset contract of ``data/batch.py``) through
megatron's ``get_forward_backward_func()(..., forward_only=True)`` with the trainer's own
``forward_step`` and loss function, on micro-batches made by the trainer's ``collate`` and
``prepare_batch`` (balanced CP split, TE THD packing). So the loss it reports for a sample is, up to
fp32 reduction order, the loss a training step reports for it (token-averaged: sum of masked
token losses over the sum of loss tokens, over micro-batches x DP x CP).

On top of the training loss it collects, per sample and per position bucket, the sums of token
losses, and optionally greedy top-1 agreement and a choice among candidate tokens at the loss
positions (needle scoring). Under CP a rank holds its share of every sample (pieces of its
documents); each token carries its sample slot and global position (split exactly as the tokens
are), so partial sums add up across CP ranks. Top-1 needs logits only at the loss positions: the final hidden states
are taken from the decoder (a forward hook) and multiplied by this rank's vocabulary shard of the
output layer; the argmax is then agreed over TP. The full ``[tokens x vocab]`` logits never exist.

Samples are spread over data-parallel replicas round-robin; every rank returns the same global
``Scores``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..data.batch import collate
from .. import platform
from ..parallel.context_parallel import move_prepared, prepare_batch
from ..training.step import forward_step as training_forward_step


@dataclass
class Scores:
    """Global results of one ``score`` call (identical on every rank)."""

    loss_sum: float
    """Sum of masked token losses, accumulated as the training step accumulates them."""
    tokens: float
    sample_loss: np.ndarray
    """Per input sample: sum of its masked token losses (nats)."""
    sample_tokens: np.ndarray
    sample_mismatches: Optional[np.ndarray] = None
    """``top1``: loss positions whose greedy (argmax) token is not the label."""
    sample_choice_correct: Optional[np.ndarray] = None
    """``candidates``: loss positions where the label's logit beats every other candidate's."""
    bucket_loss: Optional[np.ndarray] = None
    bucket_tokens: Optional[np.ndarray] = None

    @property
    def loss(self) -> float:
        """Token-averaged loss (the training loss's definition)."""
        return self.loss_sum / max(self.tokens, 1.0)


def vocab_parallel_top1(logits: torch.Tensor, vocab_start: int, group=None) -> torch.Tensor:
    """Global argmax ids ``[n]`` of logits whose last dim is this rank's vocabulary shard
    (``[vocab_start, vocab_start + V/tp)``); ties go to the lowest id, as ``torch.argmax``."""
    value, index = logits.max(dim=-1)
    index = index + vocab_start
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return index
    values = [torch.empty_like(value) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(values, value, group=group)
    dist.all_gather(indices, index, group=group)
    values, indices = torch.stack(values), torch.stack(indices)  # [tp, n], shards in vocab order
    best = values.argmax(dim=0)  # first shard holding the maximum: the lowest id
    return indices.gather(0, best[None]).squeeze(0)


def vocab_parallel_pick(logits: torch.Tensor, ids: torch.Tensor, vocab_start: int, group=None) -> torch.Tensor:
    """Logits ``[n, k]`` of the global token ids ``ids [n, k]`` from vocabulary-parallel shards."""
    v_local = logits.shape[-1]
    local = ids - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    picked = torch.where(in_shard, logits.gather(1, local.clamp(0, v_local - 1)), torch.zeros((), dtype=logits.dtype,
                                                                                            device=logits.device))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(picked, group=group)
    return picked


class _Accumulator:
    def __init__(self, n: int, device, buckets: Optional[torch.Tensor], top1: bool,
                 candidates: Optional[torch.Tensor]):
        z = lambda k: torch.zeros(k, dtype=torch.float64, device=device)  # noqa: E731
        self.total = z(2)
        self.sample_loss, self.sample_tokens = z(n), z(n)
        self.mismatches = z(n) if top1 else None
        self.choice = z(n) if candidates is not None else None
        self.edges = buckets
        nb = 0 if buckets is None else len(buckets) - 1
        self.bucket_loss, self.bucket_tokens = (z(nb), z(nb)) if buckets is not None else (None, None)
        self.candidates = candidates

    def parts(self) -> list[Optional[torch.Tensor]]:
        return [self.total, self.sample_loss, self.sample_tokens, self.mismatches, self.choice,
                self.bucket_loss, self.bucket_tokens]


class ForwardScorer:
    """Scores samples with this rank's model chunk(s) (see module doc). ``cfg`` and ``run`` are
    the training config and run record (layout, device, TE on/off)."""

    def __init__(self, model: list, cfg, run, micro_batch_size: int = 1):
        self.model, self.run = model, run
        p = cfg.parallel
        self.split = dict(cp_size=p.context, cp_rank=run.cp_rank, use_te=run.use_te, tp_size=p.tensor,
                          sequence_parallel=p.sequence_parallel)
        self.sequence_parallel = p.sequence_parallel and p.tensor > 1
        self.micro_batch_size = micro_batch_size
        self._acc: Optional[_Accumulator] = None
        self._hidden: Optional[torch.Tensor] = None

    # -- data ------------------------------------------------------------------------------------

    def _micro_batch(self, samples: Sequence[dict], slots: list[int]) -> dict:
        """Prepared on the host and copied to the device once, like a training micro-batch
        (``training.data_iter``)."""
        with platform.host_side():
            batch = collate([samples[i] for i in slots])
            prepared = prepare_batch(batch, **self.split)
            # Side data per token (sample slot, position in the sample), split exactly like the tokens:
            # passed through prepare_batch in the token and label places, so the layout cannot drift.
            b, s = batch["tokens"].shape
            slot = torch.tensor(slots, dtype=torch.long)[:, None].expand(b, s)
            side = prepare_batch({"tokens": slot, "labels": torch.arange(s)[None].expand(b, s),
                                  "loss_mask": batch["loss_mask"], "doc_ids": batch["doc_ids"]}, **self.split)
            prepared["eval_slot"], prepared["eval_position"] = side["tokens"], side["labels"]
        return move_prepared(prepared, self.run.device)

    def _plan(self, samples: Sequence[dict]) -> list[tuple[int, list[list[int]]]]:
        """(sequence length, this rank's micro-batches as sample slots) per schedule call: one call
        per length (pipeline stages exchange fixed shapes), a shorter last micro-batch on its own."""
        by_length: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            by_length.setdefault(len(s["tokens"]), []).append(i)
        calls = []
        mb = self.micro_batch_size
        for length, slots in sorted(by_length.items()):
            mine = slots[self.run.dp_rank::self.run.dp_size]
            groups = [mine[k:k + mb] for k in range(0, len(mine), mb)]
            full = [g for g in groups if len(g) == mb]
            if full:
                calls.append((length, full))
            if len(groups) > len(full):
                calls.append((length, groups[-1:]))
        return calls

    # -- model hooks -----------------------------------------------------------------------------

    def _gpt(self):
        chunk = self.model[-1]
        return getattr(chunk, "module", chunk)

    def _capture(self, _module, _inputs, output):
        self._hidden = output[0] if isinstance(output, tuple) else output

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output, training_loss = training_forward_step(iter([batch]), model)
        return output, partial(self._loss, batch, training_loss)

    def _loss(self, batch: dict, training_loss, output_tensor: torch.Tensor):
        loss_sum, num_tokens, report = training_loss(output_tensor)
        acc = self._acc
        acc.total += report["lm loss"].detach().double()
        mask = batch["loss_mask"].reshape(-1) > 0
        slot = batch["eval_slot"].reshape(-1)[mask]
        losses = output_tensor.detach().reshape(-1)[mask].double()
        ones = torch.ones_like(losses)
        acc.sample_loss.index_add_(0, slot, losses)
        acc.sample_tokens.index_add_(0, slot, ones)
        if acc.edges is not None:
            position = batch["eval_position"].reshape(-1)[mask]
            bucket = torch.bucketize(position, acc.edges, right=True) - 1
            acc.bucket_loss.index_add_(0, bucket, losses)
            acc.bucket_tokens.index_add_(0, bucket, ones)
        if acc.mismatches is not None:
            self._score_top1(batch["labels"].reshape(-1)[mask], mask, slot)
        return loss_sum, num_tokens, report

    def _score_top1(self, labels: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor) -> None:
        from megatron.core import tensor_parallel

        hidden, self._hidden = self._hidden, None
        tp_group = parallel_state.get_tensor_model_parallel_group()
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, False, group=tp_group)
        # [s, b, h] -> rows in the order of loss_mask [b, s]
        rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])[mask]
        weight = self._gpt().output_layer.weight
        logits = rows.to(weight.dtype) @ weight.t()
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
        acc = self._acc
        top1 = vocab_parallel_top1(logits, start, tp_group)
        acc.mismatches.index_add_(0, slot, (top1 != labels).double())
        if acc.choice is not None:
            cand = acc.candidates[slot]
            picked = vocab_parallel_pick(logits, torch.cat([labels[:, None], cand], dim=1), start, tp_group)
            others = picked[:, 1:].masked_fill((cand == labels[:, None]) | (cand < 0), float("-inf"))
            acc.choice.index_add_(0, slot, (picked[:, 0] > others.max(dim=1).values).double())

    # -- the call --------------------------------------------------------------------------------

    def score(self, samples: Sequence[dict], *, bucket_edges: Optional[Sequence[int]] = None,
              top1: bool = False, candidates: Optional[Sequence[Optional[np.ndarray]]] = None) -> Scores:
        """Collective (every rank of the run calls it with the same samples). ``bucket_edges``
        ``[e0=0, e1, ..., en]``: token losses summed per position range ``[e_i, e_i+1)``;
        ``top1``: count greedy mismatches at loss positions; ``candidates`` (one id array per
        sample, or None): whether the label beats the other candidates (implies ``top1``)."""
        device = self.run.device
        n = len(samples)
        edges = None if bucket_edges is None else torch.tensor(list(bucket_edges), dtype=torch.long, device=device)
        cand = None
        if candidates is not None:
            top1 = True
            k = max(len(c) for c in candidates if c is not None)
            cand = torch.full((n, k), -1, dtype=torch.long)
            for i, c in enumerate(candidates):
                if c is not None:
                    cand[i, :len(c)] = torch.as_tensor(c)
            cand = cand.to(device)
        self._acc = _Accumulator(n, device, edges, top1, cand)
        hook = None
        if top1 and self.run.is_last_stage:
            hook = self._gpt().decoder.register_forward_hook(self._capture)
        try:
            for length, groups in self._plan(samples):
                get_forward_backward_func()(
                    forward_step_func=self._forward_step,
                    data_iterator=iter([self._micro_batch(samples, g) for g in groups]),
                    model=self.model, num_microbatches=len(groups),
                    seq_length=length, micro_batch_size=len(groups[0]), forward_only=True)
        finally:
            if hook is not None:
                hook.remove()
            self._hidden = None
        parts = self._acc.parts()
        self._acc = None
        values = _reduce([p for p in parts if p is not None], device)
        it = iter(values)
        out = [next(it) if p is not None else None for p in parts]
        total = out[0]
        return Scores(loss_sum=float(total[0]), tokens=float(total[1]), sample_loss=out[1], sample_tokens=out[2],
                      sample_mismatches=out[3], sample_choice_correct=out[4], bucket_loss=out[5],
                      bucket_tokens=out[6])


def _reduce(parts: list[torch.Tensor], device) -> list[np.ndarray]:
    """Sum over DP x CP on the last pipeline stage, then share with every stage (as the
    training loss is shared)."""
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(flat, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    flat = flat.cpu().numpy()
    out, at = [], 0
    for p in parts:
        out.append(flat[at:at + p.numel()])
        at += p.numel()
    return out
