"""RMSNorm for the portable (non-TE) layer spec, usable with sequence parallelism."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm, built the way megatron builds norms (``config, hidden_size, eps``).

    megatron's torch-norm fallback refuses sequence parallelism; the only thing SP needs from a
    norm is that its weight gradient (computed on a sequence shard) is all-reduced over the TP
    group, which ``finalize_model_grads`` does for parameters tagged ``sequence_parallel``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm module built for normalization={config.normalization!r}")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
