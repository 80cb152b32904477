"""The trainer's step-1 loss at CP=2 on packed multi-document samples (the balanced split: every
sample divided by its documents, RoPE at each token's position) equals ``transformers`` run on
every document alone, from the same converted weights (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_prolong.convert import hf_to_megatron
from tests.convert._helpers import make_hf_model
from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

SEQ = 64


def _overrides(init: str) -> list[str]:
    # Mock documents of 2-31 tokens: several per sample, some longer than a CP=2 chunk (16 tokens).
    return ["model.name=llama3-debug", "model.rotary_base=8e6", "data.mock=true", "data.mock_mean_doc_length=16",
            "train.device=cpu", "train.steps=1", f"train.seq_length={SEQ}", "train.micro_batch_size=1",
            "train.global_batch_size=2", "optim.lr=1e-3", "logging.interval=100", "parallel.context=2",
            f"checkpoint.init_from={init}"]


def _step1_loss(init: str) -> float:
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    try:
        return trainer.train(load_config(None, _overrides(init))).losses[1]
    finally:
        destroy()


def _hf_loss_per_document(hf_dir, samples) -> tuple[float, int]:
    """Token-averaged loss with every document of every sample run alone through transformers."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    total, tokens, docs = 0.0, 0.0, 0
    with torch.no_grad():
        for s in samples:
            cu = s["cu_seqlens"].tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                logits = model(torch.as_tensor(s["tokens"][a:b])[None]).logits[0].double()
                losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(s["labels"][a:b]), reduction="none")
                mask = torch.as_tensor(s["loss_mask"][a:b]).double()
                total += float((losses * mask).sum())
                tokens += float(mask.sum())
                docs += 1
    return total / tokens, docs


def test_cp2_step1_loss_equals_transformers_on_each_document_alone(tmp_path):
    from megatron_prolong.config import load_config
    from megatron_prolong.data import build_train_dataset

    hf = make_hf_model(tmp_path / "hf")  # rope_theta 8e6, as model.rotary_base
    hf_to_megatron(hf, tmp_path / "init", model_name="llama3-debug", log=lambda _: None)
    losses = run_distributed(_step1_loss, 2, (str(tmp_path / "init"),))

    cfg = load_config(None, _overrides(str(tmp_path / "init")))
    dataset = build_train_dataset(cfg.data, seq_length=SEQ, seed=cfg.train.seed, vocab_size=512,
                                  num_samples=cfg.train.global_batch_size, log=lambda _: None)
    samples = [dataset[i] for i in range(cfg.train.global_batch_size)]
    assert max(np.diff(s["cu_seqlens"]).max() for s in samples) > SEQ // 4  # a document crosses chunks
    want, docs = _hf_loss_per_document(hf, samples)
    assert docs >= 3 * len(samples)
    for got in losses:  # every rank reports the global loss
        assert got == pytest.approx(want, rel=2e-5)
