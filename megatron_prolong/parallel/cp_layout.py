"""Context-parallel layout, in one place: the zigzag split, the positions the portable attention
derives from the balanced split (``flat_layout_positions``; the split itself: ``cp_balance``), the
sequence-length rule, and which CP communication each attention path supports.

Light on purpose (torch is imported inside the functions): the config checks use it before
anything heavy is loaded, the attention backends and the batch split import it.

Zigzag: the sequence is viewed as ``2*CP`` chunks of ``c = S / (2*CP)`` tokens; CP rank ``r``
keeps chunks ``r`` and ``2*CP-1-r`` (megatron-core's ``get_batch_on_this_cp_rank`` split, which
balances causal work and is the slice ``RotaryEmbedding`` takes of the RoPE table). The portable
path uses it for samples of one document; packed documents get ``cp_balance.balanced_order``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
"""Every ``parallel.cp_comm_type`` value; which of them a path supports is below."""

PORTABLE_CP_COMM_TYPES = ("all_gather",)
"""The portable attention implements CP by all-gathering K/V (Llama-3 style) only."""


@dataclass(frozen=True)
class TECommSupport:
    """What TE's THD (packed documents) context parallelism needs for one comm type."""

    min_te: Optional[tuple[int, int]]
    """Oldest TE release whose CP supports THD + ``padding_causal`` with this comm type; None: none."""
    heads_divisible: bool = False
    """Attention heads and KV heads per TP rank must be divisible by CP (Ulysses a2a)."""
    note: str = ""


# Read against TE's attention/dot_product_attention/context_parallel.py, releases 2.7-2.18:
# megatron turns causal into padding_causal for THD; AttnFuncWithCPAndKVAllGather asserts
# `not padding` and `qkv_format != "thd"` up to 2.17; AttnFuncWithCPAndQKVOA2A accepts THD from
# 2.10 and asserts heads % CP == 0; attn_forward_func_with_cp asserts THD is "not supported with
# hierarchical CP implementation yet" for a2a+p2p in every release up to 2.18.
TE_THD_CP_SUPPORT: dict[str, TECommSupport] = {
    "p2p": TECommSupport(min_te=(0, 0)),
    "a2a": TECommSupport(min_te=(2, 10), heads_divisible=True),
    "all_gather": TECommSupport(min_te=(2, 18), note="THD all-gather CP arrived in TE 2.18, "
                                "outside megatron-core 0.16.1's TE range (2.9-2.11)"),
    "a2a+p2p": TECommSupport(min_te=None, note="no TE release (checked to 2.18) supports packed "
                             "(THD) sequences with hierarchical a2a+p2p CP"),
}

DEFAULT_TE_CP_COMM_TYPE = "p2p"
DEFAULT_PORTABLE_CP_COMM_TYPE = "all_gather"


def default_cp_comm_type(use_te: bool) -> str:
    """What ``parallel.cp_comm_type=auto`` means on each attention path."""
    return DEFAULT_TE_CP_COMM_TYPE if use_te else DEFAULT_PORTABLE_CP_COMM_TYPE


def seq_multiple(cp_size: int, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """The sequence length must be a multiple of this: ``2*CP`` zigzag chunks, each of whose
    local halves splits over TP under sequence parallelism."""
    m = 2 * cp_size if cp_size > 1 else 1
    return m * tp_size if sequence_parallel and tp_size > 1 else m


def check_seq_length(seq_length: int, cp_size: int, tp_size: int = 1, sequence_parallel: bool = False,
                     what: str = "train.seq_length") -> None:
    """Raises ValueError unless ``seq_length`` fits the CP (and SP) split."""
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise ValueError(f"{what}={seq_length} must be a multiple of 2 x parallel.context = {2 * cp_size} "
                         "(zigzag context-parallel split); it is not divisible")
    if sequence_parallel and tp_size > 1 and (seq_length // cp_size) % tp_size:
        raise ValueError(f"{what}={seq_length} must be a multiple of parallel.tensor={tp_size} "
                         f"(x parallel.context={cp_size}) with sequence parallelism: the local sequence "
                         f"{seq_length // cp_size} is not divisible by {tp_size}")


def zigzag_positions(seq_length: int, cp_size: int, cp_rank: int, device=None):
    """Global positions of the ``seq_length // cp_size`` tokens CP rank ``cp_rank`` holds."""
    import torch

    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} must be divisible by 2 x context_parallel_size = {2 * cp_size}")
    c = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def gathered_positions(seq_length: int, cp_size: int, device=None):
    """Global positions of the keys after an all-gather over CP (rank-major zigzag order)."""
    import torch

    return torch.cat([zigzag_positions(seq_length, cp_size, r, device) for r in range(cp_size)])


def flat_layout_positions(layout, cp_size: int, cp_rank: int):
    """What the portable attention needs of a ``[2, B, S]`` layout (``prepare_batch``'s
    ``attention_mask``: ``[0]`` document ids, ``[1]`` the token order, rank ``r`` holding
    ``order[:, r*S/CP:(r+1)*S/CP]``), with the micro-batch seen as one sequence of ``B*S``
    positions (sample ``b`` at ``b*S ...``; documents never span samples):

    - query positions ``[S/CP * B]`` of this rank's tokens in megatron's ``[s, b]`` order;
    - key positions ``[S * B]`` in the order of the all-gathered ``[CP * S/CP, b]`` keys;
    - document ids ``[1, B*S]``: each position's document start (non-decreasing).
    """
    import torch

    from ..attention.documents import document_starts

    doc, order = layout[0], layout[1]
    b, s = order.shape
    local = s // cp_size
    offset = torch.arange(b, device=order.device)[:, None] * s
    flat = order + offset
    k_pos = flat.view(b, cp_size, local).permute(1, 2, 0).reshape(-1)
    q_pos = flat[:, cp_rank * local:(cp_rank + 1) * local].t().reshape(-1)
    docs = (document_starts(doc, s, order.device) + offset).reshape(1, -1)
    return q_pos, k_pos, docs

