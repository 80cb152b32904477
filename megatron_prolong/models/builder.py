"""ModelSpec -> megatron-core TransformerConfig, layer spec and GPTModel."""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from .gpt import ProLongGPTModel
from .norm import RMSNorm
from .registry import ModelSpec


def build_transformer_config(spec: ModelSpec, *, on_gpu: bool = False, **overrides) -> TransformerConfig:
    """Llama-3 TransformerConfig. ``on_gpu``: the run's device is CUDA (fused kernels, GPU weight
    init); ``overrides`` set parallelism, precision and recompute fields."""
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_method_std,
        # The loss function returns (sum, token count): the global batch is token-averaged.
        calculate_per_token_loss=True,
        # Fusions need TE/apex or CUDA kernels; off where those are absent.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Same initial weights for every TP/PP layout (needed for parity, cheap on CPU).
        use_cpu_initialization=not on_gpu,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(use_te: bool, attention_backend: str = "auto", device_type: str | None = None) -> ModuleSpec:
    """TE fused layer spec, or megatron's local spec with the project's portable core attention
    (its kernel: ``attention_backend``) and an RMSNorm that works with sequence parallelism."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from ..attention.portable import PortableCoreAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=PortableCoreAttention, params={"backend": attention_backend, "device_type": device_type})
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(config: TransformerConfig, use_te: bool, attention_backend: str = "auto",
               device_type: str | None = None):
    """Layer spec for every layer of this stage, plus the final norm (TE's own when TE is used)."""
    if use_te:
        return layer_spec(True)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer_spec(False, attention_backend, device_type)]
                                      * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


def build_gpt_model(
    spec: ModelSpec,
    config: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: bool = False,
    attention_backend: str = "auto",
    loss_chunk_tokens: int = 0,
    device_type: str | None = None,
) -> ProLongGPTModel:
    """A Llama-3 GPTModel for this pipeline stage: TE's fused layer spec or the portable one
    (decided by the caller, once per run: ``training/run.py``)."""
    return ProLongGPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_te, attention_backend, device_type),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=spec.rotary_base,
        rope_scaling=spec.rope_scaling,
        rope_scaling_factor=spec.rope_scaling_factor,
        loss_chunk_tokens=loss_chunk_tokens,
    )
