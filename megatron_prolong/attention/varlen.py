"""Varlen (``cu_seqlens``) kernels of the portable attention: torch's ``varlen_attn`` and FA4.

A varlen kernel attends each query segment ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` to the key
segment ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``, causal aligned to the bottom right (the last query
sees the last key). Document masking with Llama-3-style all-gather context parallelism maps onto
that the way ring-flash-attention's ``llama3_flash_attn_varlen`` does it:

- the local queries are cut into *pieces*: maximal runs that are contiguous in global position
  (each chunk of a document is) and inside one document;
- the keys of a piece are its document's tokens from the document's start up to the piece's
  last position, taken from the all-gathered K/V after reordering to global order;
- bottom-right causal then lets query ``p`` see exactly the keys ``doc_start..p``.

Pieces of one chunk have adjacent key ranges, so the packed keys are at most ``S + S/(2 CP)``
tokens per sample (the first piece of each chunk reaches back to its document's start).

``varlen_plan`` computes all of it with plain torch from the document ids and the positions (one
host sync per micro-batch: the kernels take the maximum lengths as Python ints); the plan is
cached per micro-batch like the masks of the other kernels. ``sdpa_varlen_kernel`` runs the same
segments with SDPA, for checking the plan on CPU.

Document ids must be non-decreasing along each sample (what ``megatron_prolong.data`` emits:
the document's index in the sample): a run of equal ids is one document here, while the mask
kernels (flex, sdpa) compare ids, and the two agree only then. The plan checks it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .documents import document_starts, position_rows


@dataclass
class VarlenPlan:
    """Segments of one micro-batch for a varlen kernel (see the module doc)."""

    cu_seqlens_q: torch.Tensor
    """int32 ``[n + 1]``: query pieces in the sample-major ``[b * sq]`` token order."""
    cu_seqlens_k: torch.Tensor
    """int32 ``[n + 1]``: their key segments in the packed key order."""
    max_seqlen_q: int
    max_seqlen_k: int
    key_rows: Optional[torch.Tensor]
    """long ``[total_k]``: row of each packed key in the ``[sk * b]`` (key index, sample) view of
    the keys (the layout of megatron's ``[s, b, h, d]``); None when that is the identity."""
    key_positions: torch.Tensor
    """long ``[total_k]``: global position of each packed key (for tests and diagnostics)."""


def varlen_plan(doc_ids: Optional[torch.Tensor], q_pos: torch.Tensor, k_pos: torch.Tensor,
                batch: int) -> VarlenPlan:
    """Pieces, key segments and key gather rows for queries at ``q_pos`` against keys at ``k_pos``.

    ``k_pos`` must hold every position ``0..sk-1`` once (the whole, all-gathered sequence, in any
    order); ``doc_ids`` ``[batch, sk]`` (None: one document per sample), non-decreasing per sample.
    """
    device = q_pos.device
    sq, sk = q_pos.numel(), k_pos.numel()
    inv, whole = position_rows(k_pos)
    if doc_ids is not None:
        doc = doc_ids.to(device)
        if tuple(doc.shape) != (batch, sk):
            raise ValueError(f"document ids have shape {tuple(doc.shape)}, expected [batch, S] = [{batch}, {sk}]")
        ordered = (doc[:, 1:] >= doc[:, :-1]).all()
    else:
        doc = torch.zeros(batch, sk, dtype=torch.long, device=device)
        ordered = torch.ones((), dtype=torch.bool, device=device)
    whole, ordered = torch.stack([whole, ordered]).tolist()  # one host sync for both checks
    if not whole:
        raise ValueError(f"the varlen kernels need keys at every position 0..{sk - 1} exactly once (the "
                         "whole all-gathered sequence); use the flex or sdpa backend for other key sets")
    if not ordered:
        raise ValueError("the varlen kernels need non-decreasing document ids along each sample (each "
                         "document one run of ids, as megatron_prolong.data produces); use flex or sdpa")
    doc_start = document_starts(doc, sk, device)  # [b, sk]

    # query pieces: a new one wherever the position jumps or the document changes
    dq = doc.index_select(1, q_pos)  # [b, sq]
    first = torch.ones(batch, sq, dtype=torch.bool, device=device)
    first[:, 1:] = (q_pos[1:] != q_pos[:-1] + 1)[None] | (dq[:, 1:] != dq[:, :-1])
    starts = first.reshape(-1).nonzero().squeeze(1)  # into the sample-major [b * sq] order
    ends = torch.cat([starts[1:], torch.tensor([batch * sq], device=device)])
    len_q = ends - starts
    sample = starts // sq
    first_pos = q_pos[starts % sq]
    key_start = doc_start[sample, first_pos]
    len_k = first_pos + len_q - key_start

    zero = torch.zeros(1, dtype=torch.long, device=device)
    cu_q = torch.cat([zero, len_q.cumsum(0)])
    cu_k = torch.cat([zero, len_k.cumsum(0)])
    max_q, max_k, total_k = (int(x) for x in torch.stack([len_q.max(), len_k.max(), cu_k[-1]]).tolist())
    piece = torch.repeat_interleave(torch.arange(len_k.numel(), device=device), len_k, output_size=total_k)
    key_positions = key_start[piece] + torch.arange(total_k, device=device) - cu_k[piece]
    key_rows = inv[key_positions] * batch + sample[piece]
    if total_k == sk * batch and bool((key_rows == torch.arange(total_k, device=device)).all()):
        key_rows = None  # CP=1, one sample: the keys are already in place
    return VarlenPlan(cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, key_rows, key_positions)


VarlenKernel = Callable[..., torch.Tensor]
"""``kernel(q [Tq, h, d], k [Tk, hkv, d], v, cu_q, cu_k, max_q, max_k, softmax_scale) -> [Tq, h, d]``,
bottom-right causal within each segment."""


def varlen_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan,
                              softmax_scale: float, kernel: VarlenKernel) -> torch.Tensor:
    """``[b, h, sq, d]`` queries against ``[b, hkv, sk, d]`` keys under ``plan``; ``[b, h, sq, d]`` out.

    Views of megatron's ``[s, b, h, d]`` layout (what ``PortableCoreAttention`` passes) need no
    copy for one sample; the keys are gathered into segment order with one ``index_select``."""
    b, h, sq, d = q.shape
    sk, hkv = k.shape[2], k.shape[1]
    q_t = q.permute(0, 2, 1, 3).reshape(b * sq, h, d)
    k_t = k.permute(2, 0, 1, 3).reshape(sk * b, hkv, d)
    v_t = v.permute(2, 0, 1, 3).reshape(sk * b, hkv, v.shape[-1])
    if plan.key_rows is not None:
        k_t = k_t.index_select(0, plan.key_rows)
        v_t = v_t.index_select(0, plan.key_rows)
    out = kernel(q_t, k_t, v_t, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q, plan.max_seqlen_k,
                 softmax_scale)
    return out.view(b, sq, h, out.shape[-1]).permute(0, 2, 1, 3)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def sdpa_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale):
    """The varlen contract with SDPA, segment by segment (reference for tests; slow)."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qi = q[int(cu_q[i]):int(cu_q[i + 1])].transpose(0, 1)
        ki = k[int(cu_k[i]):int(cu_k[i + 1])].transpose(0, 1)
        vi = v[int(cu_k[i]):int(cu_k[i + 1])].transpose(0, 1)
        lq, lk = qi.shape[1], ki.shape[1]
        bottom_right = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=bottom_right, scale=softmax_scale,
                                                   enable_gqa=qi.shape[0] != ki.shape[0]).transpose(0, 1))
    return torch.cat(outs)


def torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale):
    """``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 class; torch >= 2.11).

    torch 2.11: ``varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux, scale,
    window_size)``, flash only, GQA through the flash kernel's native support (no check in
    Python). torch 2.15 adds ``enable_gqa`` (required for GQA), ``seqused_k``, ``block_table``,
    ``num_splits`` and may pick cuDNN, which it refuses for causal with distinct
    ``cu_seq_q`` / ``cu_seq_k`` tensors (our case): flash again. ``window_size=(-1, 0)`` is causal,
    bottom-right aligned in the flash kernel."""
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {}
    if q.shape[1] != k.shape[1] and _accepts(varlen_attn, "enable_gqa"):
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=softmax_scale, window_size=(-1, 0), **kwargs)


def fa4_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale):
    """FlashAttention-4 (``flash_attn.cute.flash_attn_varlen_func``; causal is bottom-right, GQA
    native; it returns ``(out, lse)``)."""
    from flash_attn.cute import flash_attn_varlen_func

    res = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                 max_seqlen_k=max_k, softmax_scale=softmax_scale, causal=True)
    return res[0] if isinstance(res, tuple) else res


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


KERNELS: dict[str, VarlenKernel] = {"varlen": torch_varlen_kernel, "fa4": fa4_varlen_kernel}
