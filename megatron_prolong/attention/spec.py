"""Portable (no-TE) layer / block spec: megatron's local spec + PortableCoreAttention + norms that
allow sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (the local spec's norm without apex) asserts
``not config.sequence_parallel``, although a torch RMSNorm is exact under SP: every token is
normalised on its own. ``PortableNorm`` builds the same torch norm and marks its parameters
``sequence_parallel = config.sequence_parallel`` so that megatron's ``finalize_model_grads``
all-reduces their grads over TP (each TP rank sees only its sequence shard).

``portable_block_spec(config)`` returns the TransformerBlockSubmodules for this pipeline stage
(the final norm is a PortableNorm too); pass it as ``transformer_layer_spec`` to GPTModel.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig


class PortableNorm:
    """torch ``RMSNorm`` / ``LayerNorm`` with sequence-parallel support (see module doc)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the portable norm")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"portable norm supports RMSNorm and LayerNorm, not {config.normalization!r}")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def portable_layer_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from .portable import PortableCoreAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PortableCoreAttention
    spec.submodules.input_layernorm = PortableNorm
    spec.submodules.pre_mlp_layernorm = PortableNorm
    return spec


def portable_block_spec(config: TransformerConfig, vp_stage=None, pp_rank=None):
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[portable_layer_spec()] * n, layer_norm=PortableNorm)
