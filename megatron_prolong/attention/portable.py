"""Portable core attention: causal attention within documents, with all-gather context parallelism.

Drop-in for megatron-core's ``DotProductAttention`` in the local layer spec. The
``attention_mask`` argument of ``forward`` carries *document ids* rather than a boolean mask:
an integer tensor ``[b, S]`` giving, for every token of the **full, un-split** sequence (``S`` =
global sequence length), the index of the document it belongs to. ``None`` means one document
per sample (plain causal). A query attends to keys that are not in its future and belong to
the same document.

Context parallelism (CP = size of megatron-core's CP group) is handled here, because megatron's
local ``DotProductAttention`` refuses it. Each CP rank holds two "zigzag" chunks of the sequence
(the sequence is viewed as ``2*CP`` chunks of ``c = S / (2*CP)`` tokens; rank ``r`` keeps chunks
``r`` and ``2*CP-1-r``, the split megatron uses for the batch and the RoPE table). The module:

1. all-gathers K and V over the CP group (the ``num_query_groups`` KV heads, not the repeated
   GQA heads), in the backward pass reduce-scatters dK / dV (``_GatherSeq``);
2. computes the global position of every local query and of every gathered key;
3. attends local queries to all keys with ``mask = (pos_q >= pos_k) & (doc[pos_q] == doc[pos_k])``.

Kernels: on CUDA ``flex_attention`` (compiled, block-sparse mask from the same predicate) with a
fallback to SDPA + boolean mask; on CPU SDPA + boolean mask (flex_attention has no CPU backward).
A query row with no allowed key (impossible with causal + same document, guarded anyway)
returns zeros, never NaN.
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from . import ATTENTION_BACKENDS as _BACKENDS
from ..parallel.cp_layout import PORTABLE_CP_COMM_TYPES, gathered_positions, zigzag_positions  # noqa: F401

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# All-gather along the sequence dim (dim 0) with reduce-scatter backward
# ----------------------------------------------------------------------------------------------


class _GatherSeq(torch.autograd.Function):
    """``[s_local, ...]`` -> ``[cp * s_local, ...]`` in rank order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = torch.empty((grad.shape[0] // world,) + tuple(grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSeq.apply(x, group)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def document_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor,
                         doc_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Boolean ``[b or 1, 1, sq, sk]`` mask: True where query ``i`` may attend key ``j``."""
    mask = (q_pos[:, None] >= k_pos[None, :])[None, None]
    if doc_ids is not None:
        dq = doc_ids.index_select(1, q_pos)
        dk = doc_ids.index_select(1, k_pos)
        mask = mask & (dq[:, :, None] == dk[:, None, :])[:, None]
    return mask


class _MaskCache:
    """Per-forward cache of the mask, keyed by the identity of the doc-id tensor (all layers of a
    forward get the same ``attention_mask`` object)."""

    def __init__(self):
        self.key = None
        self.ref = None
        self.value = None

    def get(self, doc_ids, key):
        if self.key == key and (doc_ids is None or (self.ref is not None and self.ref() is doc_ids)):
            return self.value
        return None

    def put(self, doc_ids, key, value):
        self.key = key
        self.ref = weakref.ref(doc_ids) if doc_ids is not None else None
        self.value = value


_SDPA_CACHE = _MaskCache()
_FLEX_CACHE = _MaskCache()
_FLEX_STATE = {"fn": None, "failed": False}


def _flex_attention_fn():
    if _FLEX_STATE["fn"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_STATE["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_STATE["fn"]


def _flex_block_mask(q_pos, k_pos, doc_ids, batch):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_ids is None:
        def mask_mod(b, h, q, kv):
            return q_pos[q] >= k_pos[kv]
        bsz = None
    else:
        dq = doc_ids.index_select(1, q_pos).contiguous()
        dk = doc_ids.index_select(1, k_pos).contiguous()

        def mask_mod(b, h, q, kv):
            return (q_pos[q] >= k_pos[kv]) & (dq[b, q] == dk[b, kv])
        bsz = batch
    return create_block_mask(mask_mod, bsz, None, q_pos.numel(), k_pos.numel(), device=q_pos.device,
                             _compile=True)


# ----------------------------------------------------------------------------------------------
# Functional core (no megatron state): used by the module, the tests and the benchmark
# ----------------------------------------------------------------------------------------------


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: Optional[torch.Tensor],
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    softmax_scale: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
    cache: bool = True,
    mask_key: Optional[tuple] = None,
) -> torch.Tensor:
    """Masked attention on ``[b, h, s, d]`` tensors (K/V may have fewer, GQA, heads).

    ``q_pos`` / ``k_pos``: global positions of the queries / keys; ``doc_ids``: ``[b, S]``
    document ids indexed by global position (None: one document).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {backend!r}")
    gqa = q.shape[1] != k.shape[1]
    if mask_key is None:  # identifies the (q_pos, k_pos) layout; the module passes (S, cp, rank)
        mask_key = (int(q_pos[0]),)
    key = (q_pos.numel(), k_pos.numel(), q.shape[0], str(q.device)) + tuple(mask_key)
    use_flex = (backend == "flex" or (backend == "auto" and q.is_cuda)) and not _FLEX_STATE["failed"] \
        and dropout_p == 0.0
    if use_flex:
        try:
            block_mask = _FLEX_CACHE.get(doc_ids, key) if cache else None
            if block_mask is None:
                block_mask = _flex_block_mask(q_pos, k_pos, doc_ids, q.shape[0])
                if cache:
                    _FLEX_CACHE.put(doc_ids, key, block_mask)
            # Fully masked rows come out as 0 from flex_attention (no NaN).
            return _flex_attention_fn()(q, k, v, block_mask=block_mask, scale=softmax_scale,
                                        enable_gqa=gqa)
        except Exception as exc:  # pragma: no cover - GPU only
            if backend == "flex":
                raise
            _FLEX_STATE["failed"] = True
            log.warning("flex_attention failed (%s); falling back to SDPA with a boolean mask", exc)

    entry = _SDPA_CACHE.get(doc_ids, key) if cache else None
    if entry is None:
        mask = document_causal_mask(q_pos, k_pos, doc_ids)
        empty_rows = ~mask.any(-1, keepdim=True)
        if bool(empty_rows.any()):
            mask = mask | empty_rows  # attend to everything, zeroed below
        else:
            empty_rows = None
        entry = (mask, empty_rows)
        if cache:
            _SDPA_CACHE.put(doc_ids, key, entry)
    mask, empty_rows = entry
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         scale=softmax_scale, enable_gqa=gqa)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# The megatron module
# ----------------------------------------------------------------------------------------------


class PortableCoreAttention(MegatronModule):
    """Document-masked causal attention with all-gather context parallelism (see module doc)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        backend: Optional[str] = None,
    ):
        super().__init__(config=config)
        from megatron.core import parallel_state

        if cp_comm_type is not None and cp_comm_type not in PORTABLE_CP_COMM_TYPES:
            raise ValueError(
                f"the portable attention implements context parallelism by all-gather only; got "
                f"cp_comm_type={cp_comm_type!r}. Set cp_comm_type to 'all_gather' (or null), or use "
                f"the TE backend for p2p / a2a / a2a+p2p"
            )
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp = pg_collection.tp.size()
        else:
            tp = parallel_state.get_tensor_model_parallel_world_size()
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        elif config.context_parallel_size > 1:
            self.cp_group = parallel_state.get_context_parallel_group()
        else:
            self.cp_group = None
        self.cp_size = 1 if self.cp_group is None else dist.get_world_size(self.cp_group)
        self.cp_rank = 0 if self.cp_group is None else dist.get_rank(self.cp_group)
        if self.cp_size != config.context_parallel_size:
            raise ValueError(f"CP group has {self.cp_size} ranks, config says {config.context_parallel_size}")
        head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = backend or "auto"
        if self.backend not in _BACKENDS:
            raise ValueError(f"attention backend must be one of {_BACKENDS}, got {self.backend!r}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "portable attention takes document ids in attention_mask, not packed_seq_params or "
                "a bias (packed THD sequences are the TE path: prepare_batch(use_te=True))"
            )
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            raise TypeError("portable attention expects integer document ids [b, S] in attention_mask, "
                            "not a boolean mask (see megatron_prolong.parallel.context_parallel)")
        # [s, b, h, d] -> [b, h, s, d]
        s_local = query.shape[0]
        seq_length = s_local * self.cp_size
        if attention_mask is not None and attention_mask.shape[-1] != seq_length:
            raise ValueError(
                f"document ids cover {attention_mask.shape[-1]} tokens but the sequence has "
                f"{s_local} local tokens x CP {self.cp_size} = {seq_length}; attention_mask must carry "
                f"the full sequence's doc ids"
            )
        if self.cp_size > 1:
            key = gather_sequence(key, self.cp_group)
            value = gather_sequence(value, self.cp_group)
            q_pos = zigzag_positions(seq_length, self.cp_size, self.cp_rank, device=query.device)
            k_pos = gathered_positions(seq_length, self.cp_size, device=query.device)
        else:
            q_pos = k_pos = torch.arange(s_local, device=query.device)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        doc = attention_mask.to(q.device) if attention_mask is not None else None
        out = document_attention(
            q, k, v, doc, q_pos=q_pos, k_pos=k_pos, softmax_scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0, backend=self.backend,
            mask_key=(seq_length, self.cp_size, self.cp_rank),
        )
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
