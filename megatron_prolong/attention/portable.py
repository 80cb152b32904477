"""Portable core attention: causal attention within documents, with all-gather context parallelism.

Drop-in for megatron-core's ``DotProductAttention`` in the local layer spec. The
``attention_mask`` argument of ``forward`` carries *document ids* rather than a boolean mask:
an integer tensor ``[b, S]`` giving, for every token of the **full, un-split** sequence (``S`` =
global sequence length), the index of the document it belongs to, or ``prepare_batch``'s layout
``[2, b, S]`` (those ids and the token order of the balanced CP split: rank ``r`` holds positions
``order[:, r*S/CP:(r+1)*S/CP]``). ``None`` means one document per sample (plain causal). A query
attends to keys that are not in its future and belong to the same document.

Context parallelism (CP = size of megatron-core's CP group) is handled here, because megatron's
local ``DotProductAttention`` refuses it. With a layout, each rank holds its share of every sample
(``parallel/cp_balance.py``: pieces of each document, balanced for document-masked work) and
the micro-batch is seen as one sequence of ``b*S`` positions (``cp_layout.flat_layout_positions``:
every sample is split its own way); with ``[b, S]`` ids or ``None``, each rank holds megatron's
two zigzag chunks ``r`` and ``2*CP-1-r`` of ``2*CP``. The module:

1. all-gathers K and V over the CP group (the ``num_query_groups`` KV heads, not the repeated
   GQA heads), in the backward pass reduce-scatters dK / dV (``_GatherSeq``);
2. computes the global position of every local query and of every gathered key;
3. attends local queries to all keys with ``mask = (pos_q >= pos_k) & (doc[pos_q] == doc[pos_k])``.

Kernels (``backend``, ``model.attention_backend``; ``megatron_prolong.attention.ATTENTION_BACKENDS``):
``flex`` (compiled ``flex_attention``; the gathered keys put in position order and an exact
block-sparse mask from the same predicate, ``flex.py``),
``varlen`` / ``fa4`` (FlashAttention varlen kernels on ``cu_seqlens`` pieces, ``varlen.py``),
``sdpa`` (SDPA + dense boolean mask; the CPU path: flex_attention has no CPU backward); ``auto``
is flex on CUDA, sdpa on CPU. A kernel that is not available fails at construction
(``backends.py``); a kernel that fails at run time raises, it is never swapped for another.
The prepared mask / block mask / cu_seqlens are cached per micro-batch (``layout_cache.py``).
A query row with no allowed key (impossible with causal + same document, guarded anyway)
returns zeros, never NaN.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from ..parallel.cp_layout import PORTABLE_CP_COMM_TYPES, flat_layout_positions, gathered_positions, zigzag_positions
from .backends import CUDA_ONLY, AttentionBackendUnavailable, check_backend, resolve_backend
from .flex import flex_document_attention, flex_plan
from .layout_cache import LayoutCache
from .varlen import KERNELS as VARLEN_KERNELS
from .varlen import varlen_document_attention, varlen_plan


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
# Masks and kernels
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


# One cache per kind of prepared layout. The dense SDPA mask is large (sq x sk bytes per sample):
# keep one; block masks and cu_seqlens are small: keep a few for pipeline schedules, where the
# backward of one micro-batch follows the forward of the next ones.
CACHES = {"sdpa": LayoutCache(1), "flex": LayoutCache(4), "varlen": LayoutCache(4), "positions": LayoutCache(4)}


def clear_caches() -> None:
    for c in CACHES.values():
        c.clear()


def _cached(kind: str, use_cache: bool, doc_ids, q_pos, k_pos, batch: int, device, build):
    if not use_cache:
        return build()
    return CACHES[kind].get_or_build((doc_ids, q_pos, k_pos), (batch, str(device)), build)


def sdpa_mask(q_pos, k_pos, doc_ids):
    """(boolean mask, rows with no allowed key or None) for SDPA."""
    mask = document_causal_mask(q_pos, k_pos, doc_ids)
    empty_rows = ~mask.any(-1, keepdim=True)
    if bool(empty_rows.any()):
        return mask | empty_rows, empty_rows  # attend to everything, zeroed after the kernel
    return mask, None


def _sdpa_attention(q, k, v, doc, q_pos, k_pos, softmax_scale, dropout_p, cache):
    mask, empty_rows = _cached("sdpa", cache, doc, q_pos, k_pos, q.shape[0], q.device,
                               lambda: sdpa_mask(q_pos, k_pos, _on(doc, q.device)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _on(doc, device):
    return None if doc is None else doc.to(device)


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
    whole_keys: bool = False,
) -> torch.Tensor:
    """Masked attention on ``[b, h, s, d]`` tensors (K/V may have fewer, GQA, heads).

    ``q_pos`` / ``k_pos``: global positions of the queries / keys; ``doc_ids``: ``[b, S]``
    document ids indexed by global position (None: one document), on any device.
    ``cache``: reuse the mask / block mask / cu_seqlens prepared for the same ``doc_ids``,
    ``q_pos`` and ``k_pos`` storages (``layout_cache``); pass the same position tensors every
    layer to benefit. ``whole_keys``: ``k_pos`` is every position once and ``doc_ids`` runs of
    ids (the balanced CP layout): flex then needs no check of its own (``flex.flex_plan``).
    Errors of a kernel propagate: there is no silent fallback to a dense mask.
    """
    kind = resolve_backend(backend, q.device.type, dropout_p)
    if kind in CUDA_ONLY and q.device.type == "cpu":  # (a dry run's stand-in device is "meta")
        raise AttentionBackendUnavailable(f"attention backend {kind!r} runs on CUDA only (got {q.device} "
                                          "tensors); use auto or sdpa on CPU")
    if dropout_p > 0.0 and kind != "sdpa":
        raise ValueError(f"attention backend {kind!r} has no attention dropout (got {dropout_p}); use sdpa")
    b = q.shape[0]
    if kind == "sdpa":
        return _sdpa_attention(q, k, v, doc_ids, q_pos, k_pos, softmax_scale, dropout_p, cache)
    try:
        if kind == "flex":
            plan = _cached("flex", cache, doc_ids, q_pos, k_pos, b, q.device,
                           lambda: flex_plan(_on(doc_ids, q.device), q_pos, k_pos, whole_keys=whole_keys))
            if plan.key_rows is not None:  # keys in position order: the exact, tighter block mask
                k, v = k.index_select(2, plan.key_rows), v.index_select(2, plan.key_rows)
            return flex_document_attention(q, k, v, plan.block_mask, softmax_scale)
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"attention backend {kind!r} (FlashAttention) takes bf16 or fp16, got {q.dtype}; "
                            "use flex or sdpa for fp32")
        plan = _cached("varlen", cache, doc_ids, q_pos, k_pos, b, q.device,
                       lambda: varlen_plan(_on(doc_ids, q.device), q_pos, k_pos, b))
        return varlen_document_attention(q, k, v, plan, softmax_scale, VARLEN_KERNELS[kind])
    except Exception as exc:
        # Say where it happened and what else there is; never switch kernels behind the user's back
        # (a dense SDPA mask is S_local x S bytes per sample: 16 GiB at 512K tokens / CP 16).
        exc.add_note(f"portable attention: backend {kind!r} failed on q {tuple(q.shape)} {q.dtype} against "
                     f"{k.shape[2]} keys; other kernels: model.attention_backend=flex|varlen|fa4|sdpa")
        raise


# ----------------------------------------------------------------------------------------------
# The megatron module
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def layer_positions(seq_length: int, cp_size: int, cp_rank: int, device: torch.device):
    """(query, key) global positions of a CP rank, the same tensors for every layer and step (the
    mask caches key on them)."""
    if cp_size == 1:
        pos = torch.arange(seq_length, device=device)
        return pos, pos
    return (zigzag_positions(seq_length, cp_size, cp_rank, device=device),
            gathered_positions(seq_length, cp_size, device=device))


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
        device_type: Optional[str] = None,
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
        # An unavailable kernel fails here, at model build, saying what to install or choose.
        check_backend(self.backend, dropout_p=self.dropout_p,
                      cuda=None if device_type is None else device_type == "cuda")

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
            raise TypeError("portable attention expects integer document ids [b, S] (or a [2, b, S] layout) in "
                            "attention_mask, not a boolean mask (see megatron_prolong.parallel.context_parallel)")
        s_local, b = query.shape[0], query.shape[1]
        seq_length = s_local * self.cp_size
        ids = attention_mask
        if ids is not None and (ids.dim() not in (2, 3) or ids.shape[-1] != seq_length):
            raise ValueError(
                f"document ids cover {tuple(attention_mask.shape)} tokens but the sequence has "
                f"{s_local} local tokens x CP {self.cp_size} = {seq_length}; attention_mask must carry "
                f"the full sequence's doc ids [b, S] or prepare_batch's layout [2, b, S]"
            )
        if self.cp_size > 1:
            key = gather_sequence(key, self.cp_group)
            value = gather_sequence(value, self.cp_group)
        dropout_p = self.dropout_p if self.training else 0.0
        if attention_mask is not None and attention_mask.dim() == 3:
            return self._attend_layout(query, key, value, attention_mask, dropout_p)
        q_pos, k_pos = layer_positions(seq_length, self.cp_size, self.cp_rank, query.device)
        # [s, b, h, d] -> [b, h, s, d]; the doc ids go in as given (the caches key on their storage)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = document_attention(q, k, v, attention_mask, q_pos=q_pos, k_pos=k_pos, softmax_scale=self.softmax_scale,
                                 dropout_p=dropout_p, backend=self.backend)
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(s_local, b, -1)

    def _attend_layout(self, query, key, value, layout, dropout_p):
        """``prepare_batch``'s layout ``[2, b, S]`` (document ids, token order: every sample split its
        own way): the micro-batch as one sequence of ``b*S`` positions, ``[s, b]`` tokens flattened
        (a view), positions from the layout (built once per micro-batch, ``flat_layout_positions``)."""
        q_pos, k_pos, docs = CACHES["positions"].get_or_build(
            (layout,), (self.cp_size, self.cp_rank, str(query.device)),
            lambda: flat_layout_positions(layout.to(query.device), self.cp_size, self.cp_rank))
        s_local, b = query.shape[0], query.shape[1]
        q, k, v = (t.reshape(t.shape[0] * b, t.shape[2], t.shape[3]).transpose(0, 1)[None]
                   for t in (query, key, value))
        # k_pos is every position once and docs are runs, by construction (flat_layout_positions)
        out = document_attention(q, k, v, docs, q_pos=q_pos, k_pos=k_pos, softmax_scale=self.softmax_scale,
                                 dropout_p=dropout_p, backend=self.backend, whole_keys=True)
        # [1, h, s*b, d] -> [s, b, h*d]
        return out[0].transpose(0, 1).reshape(s_local, b, -1)
