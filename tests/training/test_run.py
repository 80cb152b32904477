"""The run record decides device, precision, TE, attention kernel and CP comm once, from the config
and the machine; simulated machines (a CUDA host, TE versions, apex) through monkeypatching."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong import platform
from megatron_prolong.config import ConfigError, load_config
from megatron_prolong.models.registry import ModelSpec
from megatron_prolong.training import run as run_mod

BASE = ["data.mock=true", "train.global_batch_size=8", "model.name=llama3-debug"]


@pytest.fixture
def cuda_host(monkeypatch):
    """A machine that reports a GPU, TE 2.11 and no apex."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(platform, "te_version", lambda: (2, 11))
    monkeypatch.setattr(platform, "fused_wgrad_available", lambda: False)


def _decide(overrides):
    cfg = load_config(None, BASE + overrides)
    return cfg, run_mod.decide_for_machine(cfg)


def test_cpu_device_on_a_cuda_host_is_fp32_and_portable(cuda_host):
    _, d = _decide(["train.device=cpu"])
    assert d.device_type == "cpu"
    assert not d.bf16 and d.params_dtype == torch.float32
    assert not d.use_te and d.attention_backend == "sdpa"


def test_auto_on_a_cuda_host_with_te_is_bf16_te_p2p(cuda_host):
    _, d = _decide(["parallel.context=2"])
    assert d.device_type == "cuda" and d.bf16 and d.use_te
    assert d.attention_backend == "te" and d.cp_comm_type == "p2p"


def test_portable_path_on_cuda(cuda_host):
    _, d = _decide(["model.transformer_engine=off", "parallel.context=2"])
    assert d.bf16 and not d.use_te and d.attention_backend == "flex" and d.cp_comm_type == "all_gather"


def test_gradient_accumulation_fusion_needs_apex(cuda_host, monkeypatch):
    from megatron_prolong.training.setup import transformer_config_overrides

    cfg, d = _decide([])
    assert d.use_te and not d.gradient_accumulation_fusion
    run = _fake_run(cfg, d)
    assert transformer_config_overrides(cfg, run)["gradient_accumulation_fusion"] is False
    monkeypatch.setattr(platform, "fused_wgrad_available", lambda: True)
    cfg, d = _decide([])
    assert transformer_config_overrides(cfg, _fake_run(cfg, d))["gradient_accumulation_fusion"] is True


def test_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, d = _decide([])
    assert d.device_type == "cpu" and not d.bf16 and not d.use_te and d.cp_comm_type == "all_gather"
    with pytest.raises(ConfigError, match="train.device=cuda was asked for but torch sees no GPU"):
        _decide(["train.device=cuda"])
    with pytest.raises(ConfigError, match="transformer_engine=on but Transformer Engine is not importable"):
        _decide(["model.transformer_engine=on"])


def test_te_on_with_cpu_device_is_refused(cuda_host):
    with pytest.raises(ConfigError, match="TE kernels need CUDA"):
        _decide(["model.transformer_engine=on", "train.device=cpu"])


@pytest.mark.parametrize("overrides, te, message", [
    # TE's all-gather CP asserts on THD / padding masks before 2.18 (every recipe used to default to it).
    (["parallel.context=2", "parallel.cp_comm_type=all_gather"], (2, 11), "needs TE >= 2.18"),
    (["parallel.context=2", "parallel.cp_comm_type=a2a"], (2, 9), "needs TE >= 2.10"),
    (["parallel.context=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_cp_sizes=[2, 2]"], (2, 11),
     "needs no TE release"),
    # 8B at TP 2: 4 KV heads per TP rank cannot be scattered over CP 16 (the 512K layout).
    (["model.name=llama3-8b", "parallel.tensor=2", "parallel.context=16", "parallel.cp_comm_type=a2a",
      "train.seq_length=524288", "train.global_batch_size=16"], (2, 11), "4 per TP rank must be divisible by CP 16"),
])
def test_te_cp_combinations_refused_up_front(cuda_host, monkeypatch, overrides, te, message):
    monkeypatch.setattr(platform, "te_version", lambda: te)
    cfg, d = _decide(overrides)
    with pytest.raises(ConfigError, match=message):
        run_mod.validate_decisions(cfg, d, cfg.model.spec())


def test_recipes_pass_the_te_checks(cuda_host):
    """The shipped long-context recipes (CP > 1) resolve to a comm type TE 2.11 supports."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in ("prolong_64k.yaml", "prolong_512k.yaml", "prolong_sft.yaml"):
        cfg = load_config(root / "examples" / name, ["data.mixture=null", "data.data_prefix=null",
                                                      "data.mock=true", "checkpoint.init_from=null"])
        d = run_mod.decide_for_machine(cfg)
        assert d.use_te and cfg.parallel.context > 1
        run_mod.validate_decisions(cfg, d, cfg.model.spec())


def test_pad_token_outside_the_vocabulary_is_a_config_error():
    cfg = load_config(None, BASE + ["data.pad_token_id=512"])
    d = run_mod.decide(cfg, device="cpu", te_version=None, fused_wgrad=False)
    with pytest.raises(ConfigError, match="outside the vocabulary of llama3-debug"):
        run_mod.validate_decisions(cfg, d, cfg.model.spec())


def _fake_run(cfg, decisions):
    return run_mod.Run(decisions=decisions, device=torch.device("cpu"), spec=cfg.model.spec(),
                       spec_origin=run_mod.SpecOrigin(base="registry", fields={}),
                       world_size=1, tp_rank=0, pp_rank=0, cp_rank=0, dp_rank=0, dp_size=1,
                       is_first_stage=True, is_last_stage=True)


def test_gpu_only_attention_kernel_on_cpu_is_a_config_error():
    cfg = load_config(None, BASE + ["model.attention_backend=flex"])
    d = run_mod.decide(cfg, device="cpu", te_version=None, fused_wgrad=False)
    assert d.attention_backend == "flex"
    with pytest.raises(ConfigError, match="attention_backend=flex needs a CUDA GPU"):
        run_mod.validate_decisions(cfg, d, cfg.model.spec())


# ------------------------------------------------------------------ the model spec and its origin

# A converted checkpoint of an architecture that is in no registry entry (only its metadata is read).
STORED = ModelSpec("my-llama", num_layers=3, hidden_size=48, ffn_hidden_size=112, num_attention_heads=6,
                   num_query_groups=3, vocab_size=320, rotary_base=20000.0)


@pytest.fixture
def converted(tmp_path):
    from megatron_prolong import checkpoint_layout as layout

    folder = layout.iteration_dir(tmp_path / "init", 0)
    folder.mkdir(parents=True)
    layout.write_checkpoint_meta(folder, {"model_spec": layout.encode_model_spec(STORED)})
    (tmp_path / "init" / layout.LATEST_FILE).write_text("0\n")
    return tmp_path / "init"


def _resolve(overrides):
    return run_mod.resolve_model_spec(load_config(None, ["data.mock=true", "train.global_batch_size=8"] + overrides))


def test_init_from_builds_the_checkpoints_architecture_with_no_model_settings(converted):
    spec, origin = _resolve([f"checkpoint.init_from={converted}"])
    assert spec == STORED
    assert set(origin.fields.values()) == {f"checkpoint {converted}"} and not origin.note
    assert origin.lines(spec) == [
        f"model my-llama: from checkpoint {converted}: num_layers 3, hidden_size 48, ffn_hidden_size 112, "
        "num_attention_heads 6, num_query_groups 3, vocab_size 320, rotary_base 20000, rope_scaling False, "
        "rope_scaling_factor 8, max_position_embeddings 8192, norm_epsilon 1e-05, init_method_std 0.02"]


def test_the_recipes_rope_base_and_length_go_on_top_of_the_checkpoint(converted):
    spec, origin = _resolve([f"checkpoint.init_from={converted}", "model.rotary_base=8e6",
                             "train.seq_length=16384"])
    assert spec == STORED.replace(rotary_base=8e6, max_position_embeddings=16384)
    assert origin.fields["rotary_base"] == "model.rotary_base"
    assert origin.fields["max_position_embeddings"] == "train.seq_length"
    assert origin.fields["num_layers"] == f"checkpoint {converted}"
    assert origin.lines(spec)[0].endswith("; from the recipe: rotary_base 8e+06 (model.rotary_base), "
                                          "max_position_embeddings 16384 (train.seq_length)")


def test_a_model_name_the_checkpoint_contradicts_is_reported_not_used(converted):
    # A ProLong recipe names llama3-8b; the user points init_from at another converted model.
    spec, origin = _resolve([f"checkpoint.init_from={converted}", "model.name=llama3-8b"])
    assert spec == STORED
    assert origin.note.startswith(f"model.name=llama3-8b is not used: checkpoint {converted} holds another "
                                  "architecture (checkpoint vs llama3-8b: num_layers (3 vs 32), hidden_size (48 vs 4096)")
    assert origin.lines(spec)[1] == origin.note


def test_a_resumed_save_dir_gives_the_spec_without_init_from(converted):
    spec, origin = _resolve([f"checkpoint.save_dir={converted}", "parallel.tensor=3"])
    assert spec == STORED and origin.base == f"checkpoint {converted}"


def test_no_checkpoint_builds_the_registry_model():
    spec, origin = _resolve(["model.rotary_base=8e6"])
    assert spec.name == "llama3-debug" and spec.rotary_base == 8e6
    assert origin.base == "registry llama3-debug (model.name unset)"
    assert origin.fields["rotary_base"] == "model.rotary_base" and origin.fields["num_layers"] == origin.base


@pytest.mark.parametrize("overrides, message", [
    # The checkpoint's 3 KV heads, not the default registry model's 2: checked once the spec is known.
    (["parallel.tensor=2"], r"parallel.tensor=2 must divide the 6 attention heads and 3 KV heads of my-llama "
                            r"\(from checkpoint "),
    (["parallel.pipeline=2"], r"parallel.pipeline=2 must divide the 3 layers of my-llama \(from checkpoint "),
    (["model.overrides={num_layers: 2, norm_epsilon: 1.0e-6}"],
     r"model.overrides sets num_layers=2 \(the checkpoint has 3\), but checkpoint .*'s weights load only at "
     "their own shapes"),
])
def test_checkpoint_model_mistakes_are_config_errors(converted, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _resolve([f"checkpoint.init_from={converted}"] + overrides)
