"""CPU smoke run of benchmarks/bench_attention.py at tiny sizes (seconds): every row is timed,
none failed, and the mixtures cover the sequence."""

from __future__ import annotations

import torch

from benchmarks import bench_attention as bench


def test_bench_attention_cpu_smoke(capsys):
    rows = bench.main(["--device", "cpu", "--seq-lengths", "256", "--heads", "4", "--kv-heads", "2",
                       "--head-dim", "16", "--iters", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "GF needed" in out and "vs causal" in out
    assert [(r["mixture"], r["kernel"]) for r in rows] == [("causal", "sdpa-causal"), ("prolong", "sdpa"),
                                                           ("short", "sdpa"), ("single", "sdpa")]
    assert all("error" not in r and r["ms"] > 0 for r in rows), rows
    g = torch.Generator().manual_seed(0)
    for S in (256, 65536):
        for mix in bench.MIXTURES.values():
            lens = mix(S, g)
            assert sum(lens) == S and min(lens) >= 1
