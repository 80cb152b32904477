"""The weight mapping and config translation, without any checkpoint I/O."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.convert import LlamaWeightAdapter, UnsupportedModelError, spec_from_hf_config
from megatron_prolong.convert.adapter import WEIGHT_GROUPS
from megatron_prolong.convert.hf_config import check_against_registry, hf_config_from_spec
from megatron_prolong.models import get_model_spec

from ._helpers import LLAMA31_SCALING, TINY


def _cfg(**kw):
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY, **kw}


def test_qkv_is_grouped_per_kv_head():
    spec = get_model_spec("llama3-debug")  # 4 heads, 2 KV groups, head_dim 16
    a = LlamaWeightAdapter(spec)
    g = a.group("decoder.layers.self_attention.linear_qkv.weight")
    d, h = 16, 64
    # Fill each head's rows with a label: q heads 0..3 -> 0..3, k heads -> 10, 11, v heads -> 20, 21.
    q = torch.arange(4).repeat_interleave(d)[:, None].expand(-1, h).float()
    k = (10 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, h).float()
    v = (20 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, h).float()
    fused = a.to_megatron(g, [q, k, v])
    labels = fused[::d, 0].tolist()
    assert labels == [0, 1, 10, 20, 2, 3, 11, 21]  # [group 0: q0 q1 k0 v0 | group 1: q2 q3 k1 v1]
    back = a.to_hf(g, fused)
    assert all(torch.equal(x, y) for x, y in zip(back, [q, k, v]))


def test_fc1_is_gate_then_up():
    a = LlamaWeightAdapter(get_model_spec("llama3-debug"))
    g = a.group("decoder.layers.mlp.linear_fc1.weight")
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = a.to_megatron(g, [gate, up])
    assert torch.equal(fused[:128], gate) and torch.equal(fused[128:], up)
    assert all(torch.equal(x, y) for x, y in zip(a.to_hf(g, fused), [gate, up]))


def test_every_hf_name_mapped_once_and_param_names():
    a = LlamaWeightAdapter(get_model_spec("llama3-debug"))
    names = a.all_hf_names()
    assert len(names) == len(set(names)) == 4 * 9 + 3
    norm = a.group("decoder.layers.self_attention.linear_qkv.layer_norm_weight")
    assert a.module_param_name(norm, 3) == "decoder.layers.3.input_layernorm.weight"
    assert a.module_param_name(norm, 3, use_te=True) == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    fc2 = a.group("decoder.layers.mlp.linear_fc2.weight")
    assert a.module_param_name(fc2, 0) == "decoder.layers.0.mlp.linear_fc2.weight"
    assert len(WEIGHT_GROUPS) == 9


def test_module_names_match_a_real_model():
    """Local-spec parameter names from the adapter are exactly the GPTModel's."""
    from tests.dist import run_distributed

    names = run_distributed(_model_param_names, 1)[0]
    a = LlamaWeightAdapter(get_model_spec("llama3-debug"))
    hf = {n: torch.zeros(s) for g in a.groups for layer in (range(4) if g.per_layer else [None])
          for n, s in zip(a.hf_names(g, layer), a.hf_shapes(g))}
    assert sorted(a.hf_to_megatron_state_dict(hf)) == sorted(names)


def _model_param_names():
    from megatron_prolong.models import build_gpt_model, build_transformer_config
    from megatron_prolong.parallel import initialize

    initialize(device="cpu")
    spec = get_model_spec("llama3-debug")
    model = build_gpt_model(spec, build_transformer_config(spec), use_te=False)
    return [n for n, _ in model.named_parameters()]


def test_config_translation_and_overrides():
    spec = spec_from_hf_config(_cfg(rope_scaling=LLAMA31_SCALING), name="x", rotary_base=1.28e8)
    assert (spec.num_layers, spec.num_query_groups, spec.vocab_size) == (4, 2, 512)
    assert spec.rotary_base == 1.28e8 and spec.rope_scaling and spec.rope_scaling_factor == 8.0
    back = hf_config_from_spec(spec, torch_dtype="bfloat16")
    assert back["rope_scaling"] == LLAMA31_SCALING and back["rope_theta"] == 1.28e8
    assert back["num_key_value_heads"] == 2 and back["tie_word_embeddings"] is False
    check_against_registry(spec_from_hf_config(_cfg(), name="y"), get_model_spec("llama3-debug"))


@pytest.mark.parametrize("overrides, message", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "model_type"),
    (dict(num_local_experts=8), "mixture-of-experts"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "only 'llama3'"),
    (dict(rope_scaling={**LLAMA31_SCALING, "high_freq_factor": 2.0}), "only 'factor' is configurable"),
    (dict(rope_scaling={**LLAMA31_SCALING, "original_max_position_embeddings": 4096}), "only 'factor'"),
])
def test_unsupported_configs_are_refused(overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_hf_config(_cfg(**overrides), name="x")


def test_registry_mismatch_is_refused():
    spec = spec_from_hf_config(_cfg(), name="x")
    with pytest.raises(UnsupportedModelError, match="num_layers"):
        check_against_registry(spec, get_model_spec("llama3-tiny"))
