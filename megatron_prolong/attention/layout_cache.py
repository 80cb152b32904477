"""Cache of what a micro-batch's document layout costs to prepare (masks, block masks, cu_seqlens).

Every layer of a forward gets the same ``attention_mask`` (document ids) and the same positions,
so the mask is built once and reused. The key is the *storage* of those tensors, not the Python
object: activation checkpointing (megatron's ``tensor_parallel.checkpoint``, full or selective
recompute) hands each layer's recompute a fresh ``detach()``-ed tensor of the same storage, which
an identity key would miss (one rebuild per layer per micro-batch in backward). Reading the
values instead would cost a host sync per layer.

A storage key is only sound while that storage cannot be freed and reused by another tensor
(the next micro-batch's document ids could land at the same address): each entry therefore
holds strong references to the tensors it was built from, and the key also carries shape,
stride, offset, dtype, device and the version counter (bumped by any in-place write, shared by
``detach()``). ``None`` (no document ids: plain causal) is a key of its own, never a wildcard.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch


def tensor_key(t: Optional[torch.Tensor]) -> tuple:
    """What identifies ``t``'s contents without reading them (see the module doc)."""
    if t is None:
        return ("none",)
    # Inference tensors have no version counter; they cannot be written outside inference mode.
    version = -1 if t.is_inference() else t._version
    # The storage's identity (its StorageImpl), which fake tensors have too; equivalent to its
    # address for real ones while the entry keeps it alive.
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            str(t.device), version)


class LayoutCache:
    """A small LRU of ``build()`` results keyed by the storage of the tensors they came from.

    ``capacity`` > 1 serves pipeline schedules, where the backward (with recompute) of one
    micro-batch runs after the forward of the next ones. ``builds`` counts cache misses.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.builds = 0
        self._entries: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()

    def get_or_build(self, tensors: tuple, extra: tuple, build: Callable[[], Any]) -> Any:
        key = tuple(extra) + tuple(tensor_key(t) for t in tensors)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[1]
        value = build()
        self.builds += 1
        # The strong references keep the keyed storages alive, so no other tensor can take them.
        self._entries[key] = (tuple(tensors), value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
