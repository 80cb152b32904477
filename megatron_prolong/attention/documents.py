"""What the kernels derive from document ids and key positions (shared by flex and varlen).

Documents are runs of equal ids along a sample (what ``megatron_prolong.data`` emits: the
document's index in the sample, non-decreasing); the kernels that work on key ranges need that.
"""

from __future__ import annotations

from typing import Optional

import torch


def document_starts(doc_ids: Optional[torch.Tensor], length: int, device) -> torch.Tensor:
    """``[B or 1, length]``: the position of the first token of each position's document (a new
    document wherever the id changes; ``None``: one document per sample)."""
    if doc_ids is None:
        return torch.zeros(1, length, dtype=torch.long, device=device)
    doc = doc_ids.to(device)
    pos = torch.arange(length, device=device)
    first = torch.ones_like(doc, dtype=torch.bool)
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values


def position_rows(k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, is_whole)``: ``rows[p]`` is the index in ``k_pos`` of position ``p``, and whether
    ``k_pos`` holds every position ``0..len-1`` exactly once (a 0-dim bool tensor: reading it is
    the caller's one host sync)."""
    sk = k_pos.numel()
    idx = torch.arange(sk, device=k_pos.device)
    clamped = k_pos.clamp(0, max(sk - 1, 0))
    rows = torch.empty(sk, dtype=torch.long, device=k_pos.device).scatter_(0, clamped, idx)
    # a duplicate position overwrites another's row; an out-of-range one was clamped onto another's
    return rows, (clamped == k_pos).all() & (rows.index_select(0, clamped) == idx).all()
