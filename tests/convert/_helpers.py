"""Tiny random Hugging Face Llama models for the conversion tests (nothing is downloaded)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch

# llama3-debug's architecture (4 layers, hidden 64, 4 heads / 2 KV heads, vocab 512), so the
# trainer's registry check accepts checkpoints converted from it.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=8e6, max_position_embeddings=131072, rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            # 5x the usual init scale: sharper attention, so RoPE details (theta, scaling) move logits.
            initializer_range=0.1)
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def make_hf_model(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0, max_shard_size: str = "200KB",
                  **overrides) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (safetensors; sharded by default).

    Norm weights are randomised too (HF initialises them to ones), so a swapped or dropped
    norm cannot go unnoticed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return Path(path)


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def hf_logits(path: Path, tokens: torch.Tensor, **config_overrides) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                             **config_overrides)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
