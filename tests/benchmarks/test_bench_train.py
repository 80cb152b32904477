"""benchmarks/bench_train.py on CPU: the smoke run end to end, failure isolation, FLOPs, mixes."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bench  # dataclasses look their module up while the class is built
_spec.loader.exec_module(bench)


def test_tiny_cpu_run_measures_both_frameworks(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--device", "cpu", "--tiny", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "bench_train.json").read_text())
    rows = {r["job"]["framework"]: r for r in data["results"]}
    assert set(rows) == {"ours", "hf"}
    for fw, r in rows.items():
        assert r["status"] == "ok", (fw, r)
        assert r["job"]["model"] == "llama3-debug" and r["job"]["seq_length"] == 128
        assert len(r["step_seconds"]) == len(r["losses"]) == 3  # 1 warmup + 2 timed
        # Random tokens: a freshly initialised model's loss is about ln(vocab), for both loss heads.
        assert all(abs(x - math.log(512)) < 0.3 for x in r["losses"]), (fw, r["losses"])
        assert r["tokens_per_s"] > 0 and 0 < r["tflops_doc"] <= r["tflops_causal"]
        assert 0 < r["doc_pair_fraction"] <= 1
    assert rows["ours"]["attention"] == "sdpa" and rows["ours"]["bf16"] is False
    assert rows["ours"]["plan_gib"]["total"] > 0
    with open(tmp_path / "bench_train.csv") as f:
        assert [r["framework"] for r in csv.DictReader(f)] == ["ours", "hf"]
    log = (tmp_path / "bench_train.log").read_text()
    assert "[ours] step 3" in log and "[hf] step 3" in log
    assert "ours / hf tokens/s =" in out.stdout


def test_failing_worker_is_recorded_and_the_run_goes_on(tmp_path):
    # TE forced on a CPU run: the run record refuses it; the row says so, nothing else is lost.
    job = bench.Job("ours", "llama3-debug", 2, 64, "prolong-64k", 1, 0, 1, "cpu", "full", 0, "on", "auto", 989.0)
    with open(tmp_path / "bench_train.log", "a") as log:
        result = bench.run_job(job, tmp_path, log, timeout=300)
    assert result["status"] == "error"
    assert "transformer_engine=on" in result["message"]
    assert result["job"]["framework"] == "ours"
    assert not list(tmp_path.glob(".*.json"))  # the job/result hand-over files are cleaned up


def test_worker_past_its_time_limit_is_stopped(tmp_path):
    job = bench.Job("ours", "llama3-debug", 2, 64, "prolong-64k", 1, 0, 1, "cpu", "full", 0, "off", "auto", 989.0)
    with open(tmp_path / "bench_train.log", "a") as log:
        result = bench.run_job(job, tmp_path, log, timeout=0.5)  # still importing torch by then
    assert result["status"] == "timeout" and result["wall_s"] < 30


def test_failure_classification():
    oom = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 30.00 GiB\n"
    assert bench.classify_failure(1, oom, False)[0] == "oom"
    assert bench.classify_failure(-9, "", True)[0] == "timeout"
    status, message = bench.classify_failure(-11, "step 1\nSegmentation fault\n", False)
    assert status == "error" and "Segmentation fault" in message and "-11" in message


def test_flops_match_the_parameter_count_and_the_mask():
    spec = bench.get_model_spec("llama3-8b", num_layers=4)
    S = 65536
    one = bench.training_flops(spec, S, [[S]])
    # Dense part = 6 x tokens x (matmul weights: layers without their norms, plus the output layer).
    matmul_params = spec.num_layers * (spec.params_per_layer() - 2 * spec.hidden_size) \
        + spec.hidden_size * spec.vocab_size
    assert one["dense"] == 6 * S * matmul_params
    assert one["doc"] == one["causal"]  # one document spanning the sample: causal-dense
    two = bench.training_flops(spec, S, [[S // 2, S // 2]])
    attn = lambda f: f["doc"] - f["dense"]  # noqa: E731
    assert attn(two) * 2 == pytest.approx(attn(one), rel=1e-4)  # two halves: half the pairs
    assert two["causal"] == one["causal"]
    # 4 d H L per (query, key) pair forward, 3x for training.
    assert attn(one) == 12 * spec.head_dim * spec.num_attention_heads * 4 * (S * (S + 1) // 2)


def test_length_mixes():
    kinds = [bench.sample_kind("prolong-64k", i) for i in range(1000)]
    assert kinds.count("whole") / 1000 == pytest.approx(0.63, abs=0.005)
    kinds = [bench.sample_kind("prolong-512k", i) for i in range(1000)]
    assert kinds.count("64k-docs") / 1000 == pytest.approx(0.40, abs=0.005)
    rng = np.random.default_rng(0)
    short = [n for _ in range(20) for n in bench.document_lengths("short", 65536, rng)]
    assert sum(short) == 20 * 65536 and min(short) >= 1
    assert 700 < float(np.median(short)) < 1500 and max(short) > 8 * 1024  # long-tailed around 1K
    assert bench.document_lengths("64k-docs", 524288, rng) == [65536] * 8


def test_dataset_items_follow_the_batch_contract():
    from megatron_prolong.data.batch import collate

    ds = bench.LengthMixDataset(4096, 512, "prolong-64k", seed=3)
    for i in range(4):
        item = ds[i]
        cu = item["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == 4096 and list(np.diff(cu)) == ds.lengths(i)
        assert (item["loss_mask"][cu[1:-1] - 1] == 0).all() and item["loss_mask"].sum() == 4096 - (len(cu) - 2)
        assert np.array_equal(item["tokens"][1:], item["labels"][:-1])
    batch = collate([ds[0], ds[1]])
    assert batch["doc_ids"].shape == (2, 4096)


def _args(**kw):
    base = dict(model="llama3-8b", layers="auto", max_layers=8, fit_fraction=0.92, global_batch=1,
                recompute="full", loss_chunk_tokens=2048)
    return argparse.Namespace(**{**base, **kw})


def test_layer_choice_follows_the_memory_plan():
    def planned(S, n):
        return bench.memory_plan(bench.get_model_spec("llama3-8b", num_layers=n), S, global_batch=1,
                                 recompute="full", loss_chunk_tokens=2048, attention_backend="flex")["total"]

    gpu = 79.6  # one H100 80GB, GiB
    for S in (65536, 131072):
        layers, total = bench.pick_layers(_args(), S, "flex", gpu)
        assert total == planned(S, layers) <= 0.92 * gpu
        assert layers == 8 or planned(S, layers + 1) > 0.92 * gpu  # the most that fit, up to --max-layers
    # At 512K one recomputed llama3-8b layer alone needs more than the GPU: 1 layer, flagged.
    layers, total = bench.pick_layers(_args(), 524288, "flex", gpu)
    assert layers == 1 and total > gpu
    assert bench.pick_layers(_args(layers="3"), 524288, "flex", gpu)[0] == 3


def test_hf_flex_path_applies_the_document_mask(monkeypatch):
    # The GPU baseline's attention plumbing, forward only on CPU (flex_attention has no CPU
    # backward) and uncompiled (compiling is the GPU's part, and slow here): transformers takes the
    # BlockMask as given, the registered kernel casts Q/K/V to the autocast dtype, and the result
    # equals SDPA with the dense document mask.
    import torch
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import LlamaForCausalLM

    dtypes = []

    def eager_flex(q, k, v, training=False, **kw):
        dtypes.append((q.dtype, k.dtype, v.dtype, type(kw["block_mask"]).__name__))
        return flex_attention(q, k, v, **kw)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
    spec = bench.get_model_spec("llama3-debug", num_layers=2, hidden_size=256, ffn_hidden_size=512,
                                num_attention_heads=4, num_query_groups=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(bench.hf_llama_config(spec, 256)).eval()
    bench._register_hf_flex()
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 28, 128]))[None]
    tokens, pos = torch.randint(0, 512, (1, 256)), torch.arange(256)[None]
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for kernel, impl in (("flex", bench._HF_FLEX), ("sdpa", "sdpa"), ("causal", "sdpa")):
            model.set_attn_implementation(impl)
            mask = None if kernel == "causal" else bench.hf_document_mask(doc, kernel)
            out[kernel] = model.model(input_ids=tokens, attention_mask=mask, position_ids=pos,
                                      use_cache=False).last_hidden_state.float()
    assert dtypes == [(torch.bfloat16,) * 3 + ("BlockMask",)] * 2  # both layers, one dtype, our mask
    torch.testing.assert_close(out["flex"], out["sdpa"], rtol=2e-2, atol=2e-2)
    # The first document sees nothing else either way; the later ones differ from plain causal.
    torch.testing.assert_close(out["sdpa"][:, :100], out["causal"][:, :100], rtol=2e-2, atol=2e-2)
    assert (out["sdpa"][:, 128:] - out["causal"][:, 128:]).abs().max() > 0.1
