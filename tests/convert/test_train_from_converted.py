"""A Llama-architecture model that is in no registry entry, built by ``transformers`` and converted
with the hf-to-megatron tool, trains from ``checkpoint.init_from`` with no ``model.*`` setting:
its first loss equals transformers' loss on the same batch, and the start-up line says which
field came from the checkpoint and which from the recipe. The tool's stderr has none of the
libraries' import-time notices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_prolong.models.registry import MODELS, SHAPE_FIELDS
from tests.dist import run_distributed
from tests.tool_env import tool_env

from ._helpers import LLAMA31_SCALING, make_hf_model

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
# Unlike every registry entry: other hidden size, heads, KV heads, vocabulary, RoPE base and scaling,
# norm epsilon.
ARCH = dict(vocab_size=320, hidden_size=48, intermediate_size=112, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=3, rope_theta=20000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
            rope_scaling={**LLAMA31_SCALING, "factor": 4.0})
TRAIN = ["data.mock=true", "train.device=cpu", "train.steps=1", "train.seq_length=32", "train.micro_batch_size=1",
         "train.global_batch_size=2", "optim.warmup_ratio=0.0", "checkpoint.save_at_end=false"]
RECIPE_THETA = 1.0e6
# What torch and megatron-core print at import on a machine without GPU, TE or apex.
NOTICES = ("No CUDA runtime is found", "Transformer Engine and Apex are not installed", "Apex is not installed")


def _first_losses(init_from: str, recipe: str) -> list[float]:
    """Step 1's loss (computed on the initial weights) with no recipe, then with ``recipe``."""
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    losses = []
    for path in (None, recipe):
        try:
            losses.append(trainer.train(load_config(path, TRAIN + [f"checkpoint.init_from={init_from}"])).losses[1])
        finally:
            destroy()
    return losses


def _hf_loss(hf_dir: Path, **config_overrides) -> float:
    """transformers' token-averaged loss on the trainer's first global batch (samples 0 and 1 of
    the mock data), each packed document on its own, as the trainer's document mask sees it."""
    from transformers import LlamaForCausalLM

    from megatron_prolong.config import load_config
    from megatron_prolong.data import build_train_dataset

    cfg = load_config(None, TRAIN)
    dataset = build_train_dataset(cfg.data, seq_length=cfg.train.seq_length, seed=cfg.train.seed,
                                  vocab_size=ARCH["vocab_size"], num_samples=cfg.train.global_batch_size)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                             **config_overrides).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(cfg.train.global_batch_size):
            sample = {k: torch.as_tensor(v) for k, v in dataset[i].items()}
            cu = sample["cu_seqlens"].tolist()
            assert len(cu) > 2, "the batch should hold packed documents"
            for start, end in zip(cu[:-1], cu[1:]):
                logits = model(sample["tokens"][start:end][None]).logits[0]
                ce = torch.nn.functional.cross_entropy(logits, sample["labels"][start:end], reduction="none")
                mask = sample["loss_mask"][start:end]
                total += float((ce * mask).sum())
                count += float(mask.sum())
    return total / count


def test_trains_from_a_converted_model_in_no_registry_entry(tmp_path, capfd):
    hf = make_hf_model(tmp_path / "hf", **ARCH)
    stored = [(ARCH["num_hidden_layers"], ARCH["hidden_size"], ARCH["intermediate_size"],
               ARCH["num_attention_heads"], ARCH["num_key_value_heads"], ARCH["vocab_size"])]
    assert all([tuple(getattr(s, f) for f in SHAPE_FIELDS)] != stored for s in MODELS.values())

    env = tool_env({k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    init = tmp_path / "init"
    convert = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron",
                              "--input", str(hf), "--output", str(init)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert convert.returncode == 0, convert.stderr
    # Library notices that tell a user nothing stay out of a tool's output (this one loads megatron-core).
    for notice in NOTICES:
        assert notice not in convert.stderr, convert.stderr

    recipe = tmp_path / "stage.yaml"
    recipe.write_text(f"model:\n  rotary_base: {RECIPE_THETA:e}\n")
    capfd.readouterr()
    plain, with_theta = run_distributed(_first_losses, 1, (str(init), str(recipe)))[0]
    out = capfd.readouterr().out

    assert plain == pytest.approx(_hf_loss(hf), rel=1e-5)
    assert with_theta == pytest.approx(_hf_loss(hf, rope_theta=RECIPE_THETA), rel=1e-5)
    assert with_theta != pytest.approx(plain, rel=1e-5)  # the recipe's base did reach the model

    lines = [line for line in out.splitlines() if line.startswith(f"model hf: from checkpoint {init}:")]
    assert len(lines) == 2, out
    assert "num_layers 3, hidden_size 48, ffn_hidden_size 112, num_attention_heads 6, num_query_groups 3, " \
           "vocab_size 320, rotary_base 20000, rope_scaling True, rope_scaling_factor 4" in lines[0]
    assert "recipe" not in lines[0]
    assert "rotary_base" not in lines[1].split("; from the recipe:")[0]
    assert lines[1].endswith("; from the recipe: rotary_base 1e+06 (model.rotary_base)")
