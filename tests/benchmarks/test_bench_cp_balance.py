"""benchmarks/bench_cp_balance.py: its counts are the kernels' own (the flex block masks, the varlen
plan, TE's THD split, the dense masks) on small layouts, and a tiny run prints every row."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_prolong.attention.documents import document_starts
from megatron_prolong.attention.flex import document_block_flags, ordered_keys_block_flags
from megatron_prolong.attention.varlen import varlen_plan
from megatron_prolong.parallel.context_parallel import thd_pack, thd_partition_indices
from megatron_prolong.parallel.cp_balance import balanced_order, rank_work, zigzag_order

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_cp_balance", ROOT / "benchmarks" / "bench_cp_balance.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_cp_balance"] = bench
_spec.loader.exec_module(bench)


def _layouts(rng):
    for _ in range(6):
        cp = int(rng.choice([2, 4]))
        S = 2 * cp * 128 * int(rng.integers(1, 3))
        lengths = bench._log_uniform(S, rng, 1, S // 2)
        for order in (zigzag_order(S, cp), balanced_order(lengths, cp)):
            yield cp, S, lengths, order


def test_counts_are_the_kernels_own():
    rng = np.random.default_rng(0)
    for cp, S, lengths, order in _layouts(rng):
        doc, start = bench.doc_maps(lengths)
        d = torch.from_numpy(doc)[None]
        local = S // cp
        for r in range(cp):
            q = order[r * local:(r + 1) * local]
            qt, kt = torch.from_numpy(q), torch.from_numpy(order)
            partial, full = document_block_flags(qt, kt, d[:, qt], d[:, kt])  # today's flex, rank-major keys
            assert bench.flex_block_stat_tiles(q, order, doc, local) == int((partial | full).sum())
            q_start = document_starts(d, S, "cpu")[:, qt]
            partial, full = ordered_keys_block_flags(qt, q_start, S)  # the new flex, keys in order
            assert bench.flex_ordered_tiles(q, start) == int((partial | full).sum())
            plan = varlen_plan(d, qt, kt, 1)
            lq, lk = (torch.diff(c.long()).numpy() for c in (plan.cu_seqlens_q, plan.cu_seqlens_k))
            assert bench.varlen_tiles(q, start) == bench.segment_tiles(lq, lk)
            allowed = (d[0, qt][:, None] == d[0, kt][None]) & (kt[None] <= qt[:, None])  # dense mask
            nq, nk = -(-local // 128), -(-S // 128)
            tiles = torch.zeros(nq * 128, nk * 128, dtype=torch.bool)
            tiles[:local, :S] = allowed
            assert bench.holding_tiles(q, order, doc) == int(tiles.view(nq, 128, nk, 128).any(3).any(1).sum())
        assert int(rank_work(order, lengths, cp).sum()) == sum(n * (n + 1) // 2 for n in lengths)
        # TE: the work of each rank's real tokens under thd_partition_indices, and the padded length
        work, _, padded = bench.te_layout(lengths, cp)
        batch = {"tokens": torch.zeros(1, S, dtype=torch.long), "labels": torch.zeros(1, S, dtype=torch.long),
                 "loss_mask": torch.ones(1, S), "doc_ids": d}
        packed = thd_pack(batch, cp_size=cp)
        assert padded == packed["tokens"].shape[1]
        for r in range(cp):
            idx = thd_partition_indices(packed["cu_seqlens_padded"], padded, cp, r)
            real = packed["loss_mask"][0, idx] > 0
            assert int((packed["position_ids"][0, idx][real] + 1).sum()) == work[r]


def test_tiny_run_prints_every_row(capsys):
    rows = bench.main(["--seq-lengths", "4096", "--cp", "2", "4", "--samples", "3", "--tile-samples", "1"])
    out = capsys.readouterr().out
    assert "max/mean old" in out and "K/V GiB" in out
    assert [(r["mix"], r["cp"]) for r in rows] == [(m, c) for m in bench.MIXES for c in (2, 4)]
    for r in rows:
        assert all(len(v) == 3 for v in r["bal"].values())
        assert r["tiles"]["new"]["flex"]["held"] == r["tiles"]["new"]["flex"]["sum"]  # exact mask


def test_timing_mode_runs_both_splits(capsys):
    # The GPU timing path, on CPU with SDPA at a tiny size: both splits are timed, nothing fails.
    rows = bench.main(["--seq-lengths", "512", "--cp", "2", "--mixes", "prolong", "--samples", "1",
                       "--tile-samples", "1", "--time-backends", "sdpa", "--time-device", "cpu",
                       "--time-dtype", "float32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                       "--iters", "1", "--warmup", "0"])
    assert set(rows[0]["times"]) == {("sdpa", "old"), ("sdpa", "new")}
    assert "busiest rank f+b ms, old -> new: sdpa" in capsys.readouterr().out
