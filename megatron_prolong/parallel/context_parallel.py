"""Per-micro-batch post-processing for the model: context-parallel split and attention inputs.

``prepare_batch`` turns a collated batch (``megatron_prolong.data.batch``: tokens, labels,
loss_mask [B, S], doc_ids [B, S]) into what this rank's GPTModel forward takes::

    out = prepare_batch(batch, cp_size=cp, cp_rank=r, use_te=False)
    losses = model(out["tokens"], out["position_ids"], out["attention_mask"],
                   labels=out["labels"], packed_seq_params=out["packed_seq_params"])
    # losses: [B, S_local] (portable) or [1, T_local] (TE/THD); weight with out["loss_mask"]

Portable path (``use_te=False``): every sample is split by its documents so that each CP rank
gets the same attention work (``cp_balance.balanced_order``: long documents zigzagged on their
own over every rank, shorter ones over a few ranks or whole; decided on the host from the
document lengths; the trainer and evaluation call this on the host, see ``move_prepared``). Rank ``r`` gets ``S/CP`` tokens per
sample, ascending in position; ``position_ids`` ``[B, S/CP]`` are their positions in the sample
(RoPE is taken at them: ``models.gpt.ProLongGPTModel``), and tokens, labels and loss masks are
gathered at them. ``attention_mask`` is the layout ``[2, B, S]``: the full sample's document ids
and the split's token order (the portable attention needs every rank's positions to place the
all-gathered keys). Without ``doc_ids`` (one document per sample) or at CP=1: megatron's zigzag
(``get_batch_on_this_cp_rank``'s split) and ``attention_mask`` = the ids (or None).

TE path (``use_te=True``): THD packed sequences. All samples of the micro-batch are packed into
one sequence (batch dim 1); every document is padded to a multiple of ``2*CP`` (TE's CP
requirement) with pad tokens whose loss mask is 0; ``PackedSeqParams`` carries ``cu_seqlens``
(real lengths) and ``cu_seqlens_padded``; each CP rank keeps, per document, chunks ``r`` and
``2*CP-1-r`` of that document (``transformer_engine_torch.thd_get_partitioned_indices``; a
pure-torch equivalent, ``thd_partition_indices``, is used when TE is absent and is tested to match).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from .cp_balance import balanced_order
from .cp_layout import (CP_COMM_TYPES, PORTABLE_CP_COMM_TYPES, TE_THD_CP_SUPPORT, check_seq_length,
                        zigzag_positions)

__all__ = ["CP_COMM_TYPES", "cu_seqlens_from_doc_ids", "move_prepared", "prepare_batch", "thd_pack",
           "thd_partition_indices", "validate_cp_config"]


# ----------------------------------------------------------------------------------------------
# Validation (call once at start-up, from the trainer's config checks)
# ----------------------------------------------------------------------------------------------


def validate_cp_config(*, cp_size: int, seq_length: int, use_te: bool, cp_comm_type=None,
                       hierarchical_cp_sizes: Optional[list[int]] = None, num_layers: Optional[int] = None,
                       tp_size: int = 1, sequence_parallel: bool = False,
                       num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                       te_version: Optional[tuple[int, int]] = None) -> None:
    """Fail fast with a readable message on a CP setup that cannot run.

    The TE path always packs documents as THD (``padding_causal``); what TE's CP supports for that
    format depends on the comm type and the TE release (``cp_layout.TE_THD_CP_SUPPORT``).
    ``te_version`` (major, minor) is checked when given; ``num_heads`` / ``num_kv_heads`` (whole
    model) enable the a2a head-divisibility check.
    """
    if cp_size < 1:
        raise ValueError(f"context_parallel_size must be >= 1, got {cp_size}")
    if cp_size == 1:
        return
    if not use_te:
        check_seq_length(seq_length, cp_size, tp_size, sequence_parallel, what="seq_length")
    types = cp_comm_type if isinstance(cp_comm_type, list) else [cp_comm_type]
    if isinstance(cp_comm_type, list) and num_layers is not None and len(cp_comm_type) != num_layers:
        raise ValueError(f"cp_comm_type is a list of {len(cp_comm_type)} entries; it needs one per "
                         f"layer ({num_layers})")
    for t in types:
        if use_te:
            _check_te_comm_type(t, cp_size, hierarchical_cp_sizes, tp_size, num_heads, num_kv_heads, te_version)
        elif t is not None and t not in PORTABLE_CP_COMM_TYPES:
            raise ValueError(f"the portable attention (no TE) implements CP by all-gather only; "
                             f"cp_comm_type={t!r} needs TE. Use 'all_gather' or leave it unset")
    if not use_te and hierarchical_cp_sizes:
        raise ValueError("hierarchical_context_parallel_sizes only applies to TE's a2a+p2p")


def _check_te_comm_type(t, cp_size, hierarchical_cp_sizes, tp_size, num_heads, num_kv_heads, te_version):
    if t is None:
        return
    if t not in CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type {t!r} unknown; TE supports {CP_COMM_TYPES}")
    if t == "a2a+p2p":
        if not hierarchical_cp_sizes:
            raise ValueError("cp_comm_type 'a2a+p2p' needs hierarchical_context_parallel_sizes, "
                             "e.g. [8, 2] for a2a inside a node and p2p across 2 nodes")
        prod = 1
        for x in hierarchical_cp_sizes:
            prod *= x
        if prod != cp_size:
            raise ValueError(f"hierarchical_context_parallel_sizes {hierarchical_cp_sizes} multiply "
                             f"to {prod}, not context_parallel_size {cp_size}")
    support = TE_THD_CP_SUPPORT[t]
    if te_version is not None and (support.min_te is None or tuple(te_version) < support.min_te):
        need = "no TE release" if support.min_te is None else f"TE >= {support.min_te[0]}.{support.min_te[1]}"
        raise ValueError(
            f"cp_comm_type={t!r} with packed documents (THD, padding_causal) needs {need}, but TE "
            f"{te_version[0]}.{te_version[1]} is installed ({support.note or 'TE asserts on this combination'}). "
            "Set parallel.cp_comm_type=p2p (works with every TE release), or a2a on TE >= 2.10")
    if support.heads_divisible and num_heads is not None and num_kv_heads is not None:
        a2a_size = hierarchical_cp_sizes[0] if t == "a2a+p2p" else cp_size
        for what, n in (("attention heads", num_heads), ("KV heads", num_kv_heads)):
            if (n // tp_size) % a2a_size:
                raise ValueError(
                    f"cp_comm_type={t!r} scatters heads over CP: the {n} {what} / TP {tp_size} = "
                    f"{n // tp_size} per TP rank must be divisible by CP {a2a_size}. Use "
                    "parallel.cp_comm_type=p2p, or a smaller context-parallel size")


# ----------------------------------------------------------------------------------------------
# THD (TE) helpers: pure torch, unit-tested without TE
# ----------------------------------------------------------------------------------------------


def pad_lengths(lengths: torch.Tensor, multiple: int) -> torch.Tensor:
    return (lengths + multiple - 1) // multiple * multiple


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries [0, ..., S] of one sample from per-token doc ids [S] (any labels,
    a new document starts wherever the id changes)."""
    s = doc_ids.numel()
    change = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=torch.long, device=doc_ids.device)
    end = torch.full((1,), s, dtype=torch.long, device=doc_ids.device)
    return torch.cat([zero, change.long(), end]).to(torch.int32)


def thd_pack(batch: dict, *, cp_size: int, total_multiple: int = 1) -> dict:
    """Pack a [B, S] micro-batch into one THD sequence with each document padded to a multiple of
    ``2*cp_size``; the last document is padded further so the total is a multiple of
    ``total_multiple`` (use ``2*cp*tp`` with sequence parallelism).

    Returns tokens/labels/loss_mask [1, T_padded], ``cu_seqlens`` (real) and
    ``cu_seqlens_padded`` (int32), ``max_seqlen`` (padded, python int).
    """
    mult = 2 * cp_size
    if total_multiple % mult:
        total_multiple = total_multiple * mult // _gcd(total_multiple, mult)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    doc_ids = batch.get("doc_ids")
    b, s = tokens.shape
    lens = []
    for i in range(b):
        if doc_ids is None:
            cu = torch.tensor([0, s], dtype=torch.int32)
        else:
            cu = cu_seqlens_from_doc_ids(doc_ids[i])
        lens.append((cu[1:] - cu[:-1]).long().cpu())
    real = torch.cat(lens)
    padded = pad_lengths(real, mult)
    total = int(padded.sum())
    extra = (-total) % total_multiple
    padded[-1] += extra
    n = real.numel()
    cu_real = torch.zeros(n + 1, dtype=torch.int32)
    cu_pad = torch.zeros(n + 1, dtype=torch.int32)
    cu_real[1:] = torch.cumsum(real, 0)
    cu_pad[1:] = torch.cumsum(padded, 0)
    T = int(cu_pad[-1])
    # destination index of every real token
    starts = torch.repeat_interleave(cu_pad[:-1].long() - cu_real[:-1].long(), real)
    dest = torch.arange(int(cu_real[-1])) + starts
    dev = tokens.device
    dest = dest.to(dev)

    def scatter(x, fill):
        out = torch.full((T,), fill, dtype=x.dtype, device=dev)
        out[dest] = x.reshape(-1)
        return out.unsqueeze(0)

    # Written into a buffer on the tokens' device: built there (CUDA refuses a CPU source here).
    doc_starts = torch.repeat_interleave(cu_real[:-1].long(), real).to(dev)
    positions = torch.arange(int(cu_real[-1]), device=dev) - doc_starts
    return {
        "tokens": scatter(tokens, 0),
        "labels": scatter(labels, 0),
        "loss_mask": scatter(loss_mask, 0),
        "cu_seqlens": cu_real.to(dev),
        "cu_seqlens_padded": cu_pad.to(dev),
        "max_seqlen": int(padded.max()),
        "position_ids": scatter(positions, 0),
    }


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices CP rank ``cp_rank`` keeps of a THD sequence: for every (padded) document,
    chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of its ``2*cp_size`` equal chunks.
    Same result as ``transformer_engine_torch.thd_get_partitioned_indices``."""
    cu = cu_seqlens_padded.long().cpu()
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens_padded ends at {int(cu[-1])}, sequence has {total} tokens")
    lens = cu[1:] - cu[:-1]
    if bool((lens % (2 * cp_size)).any()):
        raise ValueError(f"every padded document length must be a multiple of 2 x CP = {2 * cp_size}")
    parts = []
    for start, length in zip(cu[:-1].tolist(), lens.tolist()):
        c = length // (2 * cp_size)
        parts.append(torch.arange(start + cp_rank * c, start + (cp_rank + 1) * c))
        j = 2 * cp_size - 1 - cp_rank
        parts.append(torch.arange(start + j * c, start + (j + 1) * c))
    return torch.cat(parts).to(cu_seqlens_padded.device) if parts else torch.zeros(0, dtype=torch.long)


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _te_partition_indices(cu_seqlens_padded, total, cp_size, cp_rank):
    """TE's kernel for a batch on the GPU; the pure-torch equivalent on the host (TE's is a CUDA
    kernel only) or without TE."""
    if cu_seqlens_padded.is_cuda:
        try:
            import transformer_engine_torch as tex
        except ImportError:
            pass
        else:
            return tex.thd_get_partitioned_indices(cu_seqlens_padded, total, cp_size, cp_rank)
    return thd_partition_indices(cu_seqlens_padded, total, cp_size, cp_rank)


# ----------------------------------------------------------------------------------------------
# prepare_batch
# ----------------------------------------------------------------------------------------------


def prepare_batch(batch: dict[str, torch.Tensor], *, cp_size: int = 1, cp_rank: int = 0,
                  use_te: bool = False, tp_size: int = 1, sequence_parallel: bool = False,
                  cp_group=None) -> dict:
    """Returns ``tokens, labels, loss_mask, position_ids, attention_mask, packed_seq_params``.

    ``attention_mask`` carries the document ids of the full sequence (portable attention) or is
    None (TE THD, where ``packed_seq_params`` describes the documents). ``tp_size`` /
    ``sequence_parallel`` only matter for the THD padding (the local token count must split over
    TP). ``cp_group`` is put into ``PackedSeqParams.cp_group`` (TE path; None = megatron's group).
    """
    if use_te:
        return _prepare_thd(batch, cp_size=cp_size, cp_rank=cp_rank,
                            total_multiple=2 * cp_size * (tp_size if sequence_parallel else 1),
                            cp_group=cp_group)
    tokens = batch["tokens"]
    b, s = tokens.shape
    if cp_size > 1 and s % (2 * cp_size):
        raise ValueError(f"sequence length {s} must be divisible by 2 x context_parallel_size = {2 * cp_size}")
    doc_ids = batch.get("doc_ids")
    layout = doc_ids
    if cp_size == 1:
        index = torch.arange(s, device=tokens.device).expand(b, -1)
    elif doc_ids is None:  # one document per sample: the balanced split is megatron's zigzag
        index = zigzag_positions(s, cp_size, cp_rank, device=tokens.device).expand(b, -1)
    else:
        order = balanced_orders(doc_ids, cp_size)
        local = s // cp_size
        index = order[:, cp_rank * local:(cp_rank + 1) * local]
        layout = torch.stack([doc_ids.to(order.dtype), order])
    return {
        "tokens": tokens.gather(1, index),
        "labels": batch["labels"].gather(1, index),
        "loss_mask": batch["loss_mask"].gather(1, index),
        "position_ids": index,
        "attention_mask": layout,
        "packed_seq_params": None,
    }


def balanced_orders(doc_ids: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``[B, S]`` long, on ``doc_ids``' device: each sample's ``cp_balance.balanced_order`` (decided
    on the host from the document lengths: a device-to-host copy of the boundaries when ``doc_ids``
    is on a device)."""
    b, s = doc_ids.shape
    rows, cols = torch.nonzero(doc_ids[:, 1:] != doc_ids[:, :-1], as_tuple=True)
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy() + 1
    per_sample = np.split(cols, np.searchsorted(rows, np.arange(1, b)))  # nonzero is row-major
    orders = np.empty((b, s), dtype=np.int64)
    for i, inner in enumerate(per_sample):
        orders[i] = balanced_order(np.diff(np.concatenate([[0], inner, [s]])), cp_size)
    return torch.from_numpy(orders).to(doc_ids.device)


def _prepare_thd(batch, *, cp_size, cp_rank, total_multiple, cp_group):
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = thd_pack(batch, cp_size=cp_size, total_multiple=total_multiple)
    out = {k: packed[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if cp_size > 1:
        idx = _te_partition_indices(packed["cu_seqlens_padded"], out["tokens"].shape[1], cp_size, cp_rank)
        out = {k: v.index_select(1, idx.to(v.device)) for k, v in out.items()}
    cu, cup, mx = packed["cu_seqlens"], packed["cu_seqlens_padded"], packed["max_seqlen"]
    kwargs = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cup,
                  cu_seqlens_kv_padded=cup, max_seqlen_q=mx, max_seqlen_kv=mx)
    if cp_group is not None:
        kwargs["cp_group"] = cp_group
    out["packed_seq_params"] = PackedSeqParams(**kwargs)
    out["attention_mask"] = None
    return out


def move_prepared(prepared: dict, device: torch.device) -> dict:
    """``prepare_batch``'s output on ``device``: every tensor, ``PackedSeqParams``' included.

    The trainer and evaluation prepare batches on the host (the document boundaries, the balanced
    split and THD packing read values) and copy the result once. On CUDA the copies come from
    pinned memory: a copy from pageable memory would wait for the device's queue to drain."""
    def move(x):
        if torch.is_tensor(x):
            if x.device == device:
                return x
            if device.type == "cuda" and x.device.type == "cpu":
                x = x.pin_memory()
            return x.to(device, non_blocking=True)
        if dataclasses.is_dataclass(x):  # PackedSeqParams
            return dataclasses.replace(x, **{f.name: move(getattr(x, f.name)) for f in dataclasses.fields(x)
                                             if torch.is_tensor(getattr(x, f.name))})
        return x

    return {k: move(v) for k, v in prepared.items()}
