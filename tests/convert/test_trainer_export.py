"""HF model -> converted init checkpoint -> a few trainer steps at TP=2 -> trainer checkpoint
(with optimizer state) -> HF folder whose logits are the trained model's logits."""

from __future__ import annotations


import pytest
import torch

from megatron_prolong.convert import hf_to_megatron, megatron_to_hf
from tests.dist import run_distributed

from ._helpers import hf_logits, load_safetensors_dir, make_hf_model, read_json
from .test_parity import TOKENS, megatron_logits

pytestmark = pytest.mark.distributed

try:  # the trainer is what this test exercises; without it there is nothing to test
    from megatron_prolong.training import trainer as _trainer  # noqa: F401
except ImportError as e:  # pragma: no cover
    pytest.skip(f"trainer not importable: {e}", allow_module_level=True)


def _train_then_logits(init_from: str, save_dir: str, tokens: torch.Tensor):
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    cfg = load_config(None, [
        "model.name=llama3-debug", "model.rotary_base=2e6", "data.mock=true", "train.device=cpu",
        "train.steps=3", "train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
        "optim.lr=1e-2", "optim.warmup_ratio=0.0", "logging.interval=100", "parallel.tensor=2",
        f"checkpoint.init_from={init_from}", f"checkpoint.save_dir={save_dir}",
    ])
    try:
        result = trainer.train(cfg)
        logits = megatron_logits([save_dir], 2, 1, tokens)[0]
    finally:
        destroy()
    return result.losses, logits


def test_trained_checkpoint_exports_to_hf(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "init", model_name="llama3-debug", log=lambda _: None)
    losses, trained_logits = run_distributed(
        _train_then_logits, 2, (str(tmp_path / "init"), str(tmp_path / "run"), TOKENS))[0]
    assert len(losses) == 3

    meta = read_json(tmp_path / "run" / "iter_0000003" / "prolong_meta.json")
    assert meta["has_optimizer"] and meta["parallel"]["tensor"] == 2
    megatron_to_hf(tmp_path / "run", tmp_path / "export", log=lambda _: None)

    cfg = read_json(tmp_path / "export" / "config.json")
    assert cfg["rope_theta"] == 2e6  # the stage's theta, stored by the trainer
    # Token ids: the trainer's checkpoint records none, its init_from (the converted one) does.
    src_cfg = read_json(src / "config.json")
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (src_cfg["bos_token_id"], src_cfg["eos_token_id"])
    assert read_json(tmp_path / "export" / "generation_config.json") == read_json(src / "generation_config.json")
    before, after = load_safetensors_dir(src), load_safetensors_dir(tmp_path / "export")
    assert sorted(before) == sorted(after)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])  # it did train
    torch.testing.assert_close(hf_logits(tmp_path / "export", TOKENS), trained_logits, rtol=1e-5, atol=1e-5)
