"""flex_attention kernel of the portable attention: a block-sparse document mask built directly.

The block mask is computed from per-block minima / maxima of the positions and document ids
(``O(blocks)`` memory and work), not with ``create_block_mask``: that one evaluates the mask
element by element and, uncompiled, materialises the whole ``B x Q x KV`` boolean mask (16 GiB at
512K tokens / CP 16); its ``_compile=True`` shortcut is deprecated (DeprecationWarning in torch
2.10, 2.11 and 2.15, "will be removed"; the advice is ``torch.compile(create_block_mask)``, which
adds a compile per shape and a dependency on recompilation behaviour). The result is identical
to ``create_block_mask``'s for aligned layouts (tested on CPU): a (query block, key block) tile is

- *full* when every pair in it is allowed: all queries after all keys and one document throughout
  (and the tile is not cut by the end of the sequence, as ``create_block_mask`` pads with False);
- *partial* when some pair may be allowed: the latest query is not before the earliest key and the
  document-id ranges overlap. The kernel applies ``mask_mod`` element-wise there, so a tile that
  is marked partial but has no allowed pair only costs time, never correctness (with
  non-decreasing ids and block-aligned chunks the test is exact);
- skipped otherwise.

When the keys are the whole sequence (any order: the all-gathered CP keys) and documents are runs
of ids, ``flex_plan`` puts the keys in position order (one ``index_select`` of K and V) and builds
the mask exactly instead (``ordered_keys_block_mask``): a query needs one contiguous run of keys
(its document's start to itself), so a tile is marked iff it holds a needed pair, whatever mix of
document pieces a query tile holds (the balanced CP split puts pieces of many documents on a
rank; with the keys in all-gather order their id ranges overlap everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

BLOCK_SIZE = 128
"""flex_attention's default sparse block size (both dimensions)."""

COMPILE_BACKEND = "inductor"
"""``torch.compile`` backend of flex_attention (tests count compilations with dynamo's
``CompileCounter`` instead)."""

_COMPILED = {}


class FlexRecompileError(RuntimeError):
    """flex_attention would run uncompiled: dynamo's recompile limit was reached."""


def flex_attention_compiled():
    """flex_attention compiled once per process and backend.

    Eager flex_attention materialises the whole score matrix (hundreds of GiB at 64K), so it must
    never run uncompiled. ``fullgraph=True``: a graph break, or a recompile past dynamo's
    ``recompile_limit`` (8), raises instead of silently falling back to eager. Shapes are static
    first and dynamic from the first length that differs (dynamo's automatic dynamic shapes), so
    training (one length) gets the static kernel and an evaluation over many lengths compiles
    about twice, not once per length.
    """
    if COMPILE_BACKEND not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED[COMPILE_BACKEND] = torch.compile(flex_attention, backend=COMPILE_BACKEND, fullgraph=True)
    return _COMPILED[COMPILE_BACKEND]


def run_flex_uncompiled() -> None:
    """Call torch's flex_attention op itself from now on. For the dry run only: on fake tensors the
    op gives its output's shape and allocates no scores, and torch.compile is off there."""
    from torch.nn.attention.flex_attention import flex_attention

    _COMPILED[COMPILE_BACKEND] = flex_attention


def _block_min_max(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max along the last dim; the padding of a cut last block is ignored."""
    pad = -x.shape[-1] % block
    info = torch.iinfo(x.dtype)

    def padded(value):  # (F.pad takes its value as a float, which cannot hold int64's extremes)
        return torch.cat([x, x.new_full(x.shape[:-1] + (pad,), value)], -1).unflatten(-1, (-1, block))

    return padded(info.max).amin(-1), padded(info.min).amax(-1)


def _complete_blocks(n: int, block: int, device) -> torch.Tensor:
    return (torch.arange(-(-n // block), device=device) + 1) * block <= n


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``[..., nq, nk]`` block flags -> (blocks per row, their column indices first), int32,
    the form ``BlockMask.from_kv_blocks`` takes."""
    dense = dense.to(torch.int32)
    num = dense.sum(-1).to(torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def ordered_keys_block_flags(q_pos: torch.Tensor, q_start: torch.Tensor, num_keys: int,
                             block: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` tile flags ``[B, 1, nq, nk]``, exact, for keys that are the positions
    ``0 .. num_keys-1`` in order (``q_start`` ``[B, sq]``: first position of each query's document).

    A query needs the keys ``q_start .. q_pos``: one contiguous run of key tiles. A tile is marked
    iff it holds a needed pair (the union of the runs of its queries, by a difference array), so no
    query layout (chunks of many documents in one tile) costs a tile that has nothing to compute.
    Full: one document throughout the query tile, every key of the tile in ``[q_start, min q_pos]``."""
    b, sq = q_start.shape
    nq, nk = -(-sq // block), -(-num_keys // block)
    row = (torch.arange(sq, device=q_pos.device) // block) * (nk + 1)
    runs = torch.zeros(b, nq * (nk + 1), dtype=torch.int32, device=q_pos.device)
    ones = torch.ones(b, sq, dtype=torch.int32, device=q_pos.device)
    runs.scatter_add_(1, row + q_start // block, ones)
    runs.scatter_add_(1, (row + q_pos // block + 1).expand(b, -1), -ones)
    some = runs.view(b, nq, nk + 1).cumsum(-1)[..., :nk] > 0
    s_lo, s_hi = _block_min_max(q_start, block)
    q_lo, _ = _block_min_max(q_pos, block)
    key_first = torch.arange(nk, device=q_pos.device) * block
    full = ((s_lo == s_hi) & _complete_blocks(sq, block, q_pos.device))[..., None] \
        & (key_first >= s_lo[..., None]) & (key_first + block - 1 <= q_lo[:, None]) \
        & (key_first + block <= num_keys)
    return (some & ~full)[:, None], full[:, None]


def ordered_keys_block_mask(q_pos: torch.Tensor, doc_ids: Optional[torch.Tensor], num_keys: int,
                            block: int = BLOCK_SIZE):
    """flex_attention ``BlockMask`` for queries at ``q_pos`` against keys at positions
    ``0 .. num_keys-1`` in order: query ``i`` attends key ``j`` iff ``j`` is in ``i``'s document
    (a run of equal ``doc_ids``, ``[B, num_keys]``; None: one document) and ``j <= q_pos[i]``."""
    from torch.nn.attention.flex_attention import BlockMask

    from .documents import document_starts

    q_start = document_starts(doc_ids, num_keys, q_pos.device).index_select(1, q_pos).contiguous()
    if q_start.shape[0] == 1:
        first = q_start[0]

        def mask_mod(b, h, q, kv):
            return (kv >= first[q]) & (kv <= q_pos[q])
    else:
        def mask_mod(b, h, q, kv):
            return (kv >= q_start[b, q]) & (kv <= q_pos[q])
    partial, full = ordered_keys_block_flags(q_pos, q_start, num_keys, block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_pos.numel(), num_keys))


@dataclass
class FlexPlan:
    """What flex_attention gets for one micro-batch (built once, cached like the other layouts)."""

    block_mask: object
    key_rows: Optional[torch.Tensor]
    """long ``[sk]``: the keys to take, in position order (``k.index_select(2, key_rows)``); None
    when they already are in order, or when the general mask is used."""


def flex_plan(doc_ids: Optional[torch.Tensor], q_pos: torch.Tensor, k_pos: torch.Tensor, *,
              whole_keys: bool = False) -> FlexPlan:
    """Keys that are the whole sequence (any order, e.g. all-gathered over CP) and documents that
    are runs of ids are put in position order, with the exact mask (``ordered_keys_block_mask``);
    anything else gets the block-statistics mask on the keys as given (``document_block_mask``).

    ``whole_keys``: the caller knows the keys are every position once and the documents runs (the
    balanced CP split's layout, by construction). Without it the plan checks, reading one value
    on the host, except when the keys are the queries (CP 1): in order already, where the block
    statistics are exact for runs of ids."""
    from .documents import position_rows

    if k_pos is q_pos:
        return FlexPlan(document_block_mask(q_pos, k_pos, doc_ids), None)
    rows, whole = position_rows(k_pos)
    if whole_keys:
        return FlexPlan(ordered_keys_block_mask(q_pos, doc_ids, k_pos.numel()), rows)
    in_order = (rows == torch.arange(rows.numel(), device=rows.device)).all()
    runs = torch.ones((), dtype=torch.bool, device=k_pos.device) if doc_ids is None \
        else (doc_ids[:, 1:] >= doc_ids[:, :-1]).all().to(k_pos.device)
    whole, in_order, runs = torch.stack([whole, in_order, runs]).tolist()
    if whole and runs:
        return FlexPlan(ordered_keys_block_mask(q_pos, doc_ids, k_pos.numel()), None if in_order else rows)
    return FlexPlan(document_block_mask(q_pos, k_pos, doc_ids), None)


def document_block_flags(q_pos: torch.Tensor, k_pos: torch.Tensor, doc_q: Optional[torch.Tensor],
                         doc_k: Optional[torch.Tensor], block: int = BLOCK_SIZE):
    """``(partial, full)`` boolean tile flags ``[B or 1, 1, nq, nk]`` (see the module doc).

    ``doc_q`` / ``doc_k``: document ids of the queries / keys ``[B, sq]`` / ``[B, sk]`` (None: one
    document)."""
    q_lo, q_hi = _block_min_max(q_pos, block)
    k_lo, k_hi = _block_min_max(k_pos, block)
    some = q_hi[:, None] >= k_lo[None, :]
    every = (q_lo[:, None] >= k_hi[None, :]) & _complete_blocks(q_pos.numel(), block, q_pos.device)[:, None] \
        & _complete_blocks(k_pos.numel(), block, k_pos.device)[None, :]
    some, every = some[None], every[None]
    if doc_q is not None:
        dq_lo, dq_hi = _block_min_max(doc_q, block)
        dk_lo, dk_hi = _block_min_max(doc_k, block)
        some = some & (dq_lo[:, :, None] <= dk_hi[:, None, :]) & (dk_lo[:, None, :] <= dq_hi[:, :, None])
        one_doc = (dq_lo == dq_hi)[:, :, None] & (dk_lo == dk_hi)[:, None, :] \
            & (dq_lo[:, :, None] == dk_lo[:, None, :])
        every = every & one_doc
    full = every
    partial = some & ~full
    return partial[:, None], full[:, None]


def document_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, doc_ids: Optional[torch.Tensor],
                        block: int = BLOCK_SIZE):
    """flex_attention ``BlockMask``: query ``i`` attends key ``j`` iff ``k_pos[j] <= q_pos[i]`` and
    both are in the same document (``doc_ids`` ``[B, S]`` indexed by global position)."""
    from torch.nn.attention.flex_attention import BlockMask

    if doc_ids is None:
        doc_q = doc_k = None

        def mask_mod(b, h, q, kv):
            return q_pos[q] >= k_pos[kv]
    else:
        doc_q = doc_ids.index_select(1, q_pos).contiguous()
        doc_k = doc_ids.index_select(1, k_pos).contiguous()

        def mask_mod(b, h, q, kv):
            return (q_pos[q] >= k_pos[kv]) & (doc_q[b, q] == doc_k[b, kv])
    partial, full = document_block_flags(q_pos, k_pos, doc_q, doc_k, block)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q_pos.numel(), k_pos.numel()))


def flex_document_attention(q, k, v, block_mask, softmax_scale: float) -> torch.Tensor:
    """``[b, h, s, d]`` attention under ``block_mask``; rows with no allowed key come out as 0."""
    try:
        return flex_attention_compiled()(q, k, v, block_mask=block_mask, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    except Exception as exc:
        if not _recompile_limit_hit(exc):
            raise
        from torch._dynamo import config

        raise FlexRecompileError(
            f"flex_attention reached torch._dynamo.config.recompile_limit ({config.recompile_limit}) at q "
            f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}: it would run uncompiled, materialising the "
            "whole score matrix. Each new combination of dtype, heads, batch size or static length costs "
            "a compilation (TORCH_LOGS=recompiles says why); use fewer (e.g. evaluate fewer lengths or "
            "one micro-batch size), or raise torch._dynamo.config.recompile_limit") from exc


def _recompile_limit_hit(exc: BaseException) -> bool:
    while exc is not None:
        if type(exc).__name__ in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
