"""HF ``config.json`` (Llama architecture) <-> :class:`ModelSpec`, refusing what cannot be mapped.

Anything the Megatron model would silently compute differently is an error here: biases,
tied embeddings (unless the caller opts into untying), MoE, other activations, other RoPE
scaling schemes, or Llama-3.1 scaling with parameters megatron-core cannot express.
"""

from __future__ import annotations

from typing import Any

from ..models.registry import ModelSpec, architecture_differences
from .token_ids import TOKEN_ID_KEYS, default_token_ids

# megatron-core's RotaryEmbedding._apply_scaling only exposes ``factor``; the rest is fixed.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}



class UnsupportedModelError(ValueError):
    """The HF model cannot be represented exactly by megatron-prolong's Llama GPTModel."""


def spec_from_hf_config(cfg: dict[str, Any], *, name: str, rotary_base: float | None = None,
                        untie_embeddings: bool = False) -> ModelSpec:
    """Validate a Llama HF config and translate it. ``rotary_base`` overrides ``rope_theta``."""
    problems = []
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type") != "llama" or archs != ["LlamaForCausalLM"]:
        problems.append(f"model_type={cfg.get('model_type')!r}, architectures={archs} "
                        "(only model_type 'llama' / LlamaForCausalLM is supported)")
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]} (mixture-of-experts models are not supported)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true (the Llama-3 Megatron model has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only SwiGLU with silu is supported)")
    if cfg.get("tie_word_embeddings", False) and not untie_embeddings:
        problems.append("tie_word_embeddings=true (megatron-prolong trains untied input/output "
                        "embeddings; pass --untie-embeddings to start the output layer as a copy "
                        "of the embedding)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        problems.append(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size="
                        f"{cfg['hidden_size']} (not supported)")
    if cfg.get("sliding_window") not in (None, 0) and cfg.get("use_sliding_window", True):
        problems.append(f"sliding_window={cfg['sliding_window']} (not supported)")

    rope_scaling, factor = False, 8.0
    rs = cfg.get("rope_scaling")
    if rs:
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type != "llama3":
            problems.append(f"rope_scaling type {rope_type!r} (only 'llama3' is supported)")
        else:
            mismatched = {k: rs.get(k) for k, v in MEGATRON_LLAMA3_ROPE.items() if float(rs.get(k, v)) != v}
            if mismatched:
                problems.append(f"llama3 rope_scaling {mismatched}: megatron-core applies fixed "
                                f"{MEGATRON_LLAMA3_ROPE}, only 'factor' is configurable")
            rope_scaling, factor = True, float(rs["factor"])
    if problems:
        raise UnsupportedModelError("cannot convert this model:\n  - " + "\n  - ".join(problems))

    return ModelSpec(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        rotary_base=float(rotary_base if rotary_base is not None else cfg.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        norm_epsilon=cfg.get("rms_norm_eps", 1e-5),
        init_method_std=cfg.get("initializer_range", 0.02),
    )


def check_against_registry(spec: ModelSpec, expected: ModelSpec) -> None:
    """Raise if the HF model is not the architecture of the named registry entry."""
    diffs = architecture_differences(spec, expected)
    if diffs:
        raise UnsupportedModelError(f"the HF model does not match --model {expected.name} (HF config vs "
                                    f"{expected.name}):\n  - " + "\n  - ".join(diffs))


def hf_config_from_spec(spec: ModelSpec, *, torch_dtype: str, token_ids: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM``. ``token_ids``: bos / eos / pad (see
    ``token_ids.resolve_export_token_ids``); None: the defaults for the vocabulary."""
    ids = default_token_ids(spec.vocab_size) if token_ids is None else token_ids
    cfg: dict[str, Any] = {k: ids[k] for k in TOKEN_ID_KEYS if ids.get(k) is not None}
    cfg.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        hidden_act="silu",
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.norm_epsilon,
        initializer_range=spec.init_method_std,
        rope_theta=spec.rotary_base,
        rope_scaling=({"rope_type": "llama3", "factor": spec.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
                      if spec.rope_scaling else None),
        tie_word_embeddings=False,
        pretraining_tp=1,
        use_cache=True,
        torch_dtype=torch_dtype,
    )
    return cfg
