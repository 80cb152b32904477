from __future__ import annotations

import pytest

from megatron_prolong.models import get_model_spec, list_models


def test_parameter_counts_match_the_published_models():
    # Llama-3-8B: 8.03B parameters; Llama-3-70B: 70.55B; Llama-3.2-1B: 1.24B.
    assert get_model_spec("llama3-8b").num_parameters() == pytest.approx(8.03e9, rel=2e-3)
    assert get_model_spec("llama3-70b").num_parameters() == pytest.approx(70.55e9, rel=2e-3)
    assert get_model_spec("llama3.2-1b").num_parameters() == pytest.approx(1.498e9, rel=2e-3)  # untied here


def test_flavours_share_the_architecture():
    for name in list_models():
        spec = get_model_spec(name)
        assert spec.num_attention_heads % spec.num_query_groups == 0
        assert spec.hidden_size % spec.num_attention_heads == 0
    assert get_model_spec("llama3.1-8b").rope_scaling and not get_model_spec("llama3-8b").rope_scaling


def test_overrides_and_errors():
    assert get_model_spec("llama3-8b", rotary_base=1.28e8).rotary_base == 1.28e8
    with pytest.raises(ValueError, match="unknown model"):
        get_model_spec("gpt2")
    with pytest.raises(ValueError, match="unknown model fields"):
        get_model_spec("llama3-8b", heads=3)
