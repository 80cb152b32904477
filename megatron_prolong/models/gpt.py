"""The project's GPTModel: megatron-core's, with room for a memory-bounded loss head."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class ProLongGPTModel(GPTModel):
    """megatron-core GPTModel; forward(labels=...) returns per-token losses [b, s]."""
