#!/usr/bin/env python
"""Context-parallel balance and kernel tile efficiency of packed, document-masked samples, counted
exactly on the CPU from document lengths (no tensors of the model's size): today's split next to
the new one, for the portable attention and TE's THD layout.

Layouts (per sample of ``S`` tokens, ``CP`` ranks):

- ``old``: the whole-sequence zigzag the portable path used (megatron's split: rank r holds chunks
  r and 2CP-1-r of the sample);
- ``new``: ``parallel.cp_balance.balanced_order``, what ``prepare_batch`` now produces;
- ``te``: TE's THD split (each document padded to a multiple of 2CP and zigzagged on its own; the
  TE path's layout, unchanged).

Figures, per (length, mix, CP), over ``--samples`` random samples (tiles over ``--tile-samples``):

- ``max/mean``: attention work (query-key pairs a document mask allows) of the busiest rank over
  the mean rank, averaged over the samples, and the worst sample;
- per kernel, 128x128 tiles: ``tiles`` = the busiest rank's computed tiles relative to the old
  layout's busiest rank (what the step waits for); ``dens`` = needed pairs / (computed tiles x
  128^2), all ranks; ``hold`` = computed tiles that hold at least one needed pair / computed tiles.
  Kernels: ``varlen`` (FlashAttention varlen on the plan's ``cu_seqlens``: per query piece, key
  tiles up to the causal edge; every computed tile holds a needed pair), ``flex`` (old: the block
  mask from block statistics over the rank-major all-gathered keys; new: keys in position order
  with the exact block mask, ``flex.ordered_keys_block_mask``), ``sdpa`` (dense: every tile),
  ``te`` (TE's p2p ring on the padded chunks: a causal diagonal step, then CP-1 steps of half the
  queries or half the keys);
- ``K/V GiB``: K and V bytes each rank receives per layer in the forward (all-gather: the other
  ranks' tokens; TE p2p: the other ranks' padded tokens), bf16, ``--kv-heads`` x ``--head-dim``
  per token, divided by ``--tp``. The same for the old and the new portable split.

Mixes (ProLong-like): ``prolong`` one document of 60% of S + short ones (log-uniform S/128..S/8,
bench_attention's), ``short`` 0.5K-8K documents, ``pieces`` 2K-64K documents (stage 2's 64K
folders at 512K), ``single`` one document.

With ``--time-backends`` (GPU): forward+backward time of the busiest rank's attention (its
queries against all ``S`` keys, llama3-8b heads, bf16; the first tile sample of each row), old split
next to new. ``flex`` old = the block-statistics mask over the rank-major keys (the code before
the balanced split), new = ``document_attention`` as training runs it (keys in position order,
exact mask); ``varlen`` / ``fa4`` / ``sdpa``: ``document_attention`` on either layout.

    python benchmarks/bench_cp_balance.py                    # 64K and 512K, CP 2-16, 20 samples
    python benchmarks/bench_cp_balance.py --seq-lengths 65536 --cp 8 --rank-shares 0 0.02 0.05
    python benchmarks/bench_cp_balance.py --time-backends flex varlen --samples 2 --tile-samples 1  # GPU
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from megatron_prolong.parallel.cp_balance import RANK_SHARE, balanced_order, doc_work, rank_work, zigzag_order

TILE = 128


def _log_uniform(S, rng, lo, hi, first=()):
    lens, left = list(first), S - sum(first)
    while left > 0:
        n = min(left, int(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        lens.append(n)
        left -= n
    return lens


MIXES = {
    "prolong": lambda S, rng: _log_uniform(S, rng, max(1, S // 128), max(2, S // 8), first=(int(0.6 * S),)),
    "short": lambda S, rng: _log_uniform(S, rng, 512, 8192),
    "pieces": lambda S, rng: _log_uniform(S, rng, 2048, 65536),
    "single": lambda S, rng: [S],
}


# ----------------------------------------------------------------------------------------------
# Exact counts from positions (a rank's queries: ascending global positions)
# ----------------------------------------------------------------------------------------------


def doc_maps(lengths):
    """(document index, document start) of every position."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.arange(lengths.size), lengths), np.repeat(np.cumsum(lengths) - lengths, lengths)


def _tile_min_max(x):
    pad = -x.size % TILE
    lo = np.concatenate([x, np.full(pad, np.iinfo(np.int64).max)]).reshape(-1, TILE).min(1)
    hi = np.concatenate([x, np.full(pad, np.iinfo(np.int64).min)]).reshape(-1, TILE).max(1)
    return lo, hi


def varlen_tiles(q, doc_start):
    """FlashAttention varlen tiles of the plan ``varlen_plan`` makes: query pieces (runs contiguous
    in position within one document) against their document's keys up to the piece's end,
    bottom-right causal: per query tile m, key tiles up to ceil(min(lk, (m+1)T + lk - lq) / T)."""
    ds = doc_start[q]
    first = np.ones(q.size, dtype=bool)
    first[1:] = (q[1:] != q[:-1] + 1) | (ds[1:] != ds[:-1])
    start = np.nonzero(first)[0]
    end = np.append(start[1:], q.size)
    lq, lk = end - start, q[end - 1] - ds[start] + 1
    return segment_tiles(lq, lk)


def segment_tiles(lq, lk):
    """Computed tiles of bottom-right causal segments (FlashAttention's n_block_max)."""
    lq, lk = np.asarray(lq, dtype=np.int64), np.asarray(lk, dtype=np.int64)
    nq = -(-lq // TILE)
    seg = np.repeat(np.arange(lq.size), nq)
    m = np.arange(int(nq.sum())) - np.repeat(np.cumsum(nq) - nq, nq)
    return int((-(-np.minimum(lk[seg], (m + 1) * TILE + lk[seg] - lq[seg]) // TILE)).sum())


def flex_block_stat_tiles(q, keys, doc, block_len):
    """Tiles ``flex.document_block_flags`` marks (partial or full) for keys in the given order,
    ascending within blocks of ``block_len`` (a multiple of the tile): a tile is computed when the
    latest query is not before the earliest key and the tiles' document-id ranges overlap."""
    q_lo, q_hi = _tile_min_max(q)
    dq_lo, dq_hi = _tile_min_max(doc[q])
    total = 0
    for b0 in range(0, keys.size, block_len):
        k = keys[b0:b0 + block_len]
        k_lo, _ = _tile_min_max(k)
        dk_lo, dk_hi = _tile_min_max(doc[k])
        lo = np.searchsorted(dk_hi, dq_lo, "left")
        hi = np.minimum(np.searchsorted(dk_lo, dq_hi, "right"), np.searchsorted(k_lo, q_hi, "right"))
        total += int(np.maximum(hi - lo, 0).sum())
    return total


def flex_ordered_tiles(q, doc_start):
    """Tiles ``flex.ordered_keys_block_flags`` marks (keys in position order, exact): per query tile,
    the union over its documents of the key tiles [doc start, latest query] / T."""
    qt = np.arange(q.size) // TILE
    ds = doc_start[q]
    last = np.ones(q.size, dtype=bool)  # last query of each (tile, document) group
    last[:-1] = (qt[1:] != qt[:-1]) | (ds[1:] != ds[:-1])
    g_qt, lo, hi = qt[last], ds[last] // TILE, q[last] // TILE
    prev_hi = np.full(g_qt.size, -1, dtype=np.int64)  # groups ascend within a tile: the previous one
    same = np.zeros(g_qt.size, dtype=bool)
    same[1:] = g_qt[1:] == g_qt[:-1]
    prev_hi[1:] = np.where(same[1:], hi[:-1], -1)
    return int(np.maximum(hi - np.maximum(lo, prev_hi + 1) + 1, 0).sum())


def holding_tiles(q, keys, doc):
    """Tiles of (queries in their order) x (keys in theirs) that hold a needed pair: a query and a
    key of one document, the key not after the query (exact, by joining the tiles' documents)."""
    def groups(pos, reduce):
        t = np.arange(pos.size) // TILE
        key = t * (doc.max() + 1) + doc[pos]
        uk, inv = np.unique(key, return_inverse=True)
        val = np.full(uk.size, np.iinfo(np.int64).min if reduce is np.maximum else np.iinfo(np.int64).max)
        reduce.at(val, inv, pos)
        return uk // (doc.max() + 1), uk % (doc.max() + 1), val

    q_t, q_d, q_max = groups(q, np.maximum)
    k_t, k_d, k_min = groups(keys, np.minimum)
    order = np.lexsort((k_min, k_d))
    k_t, k_d, k_min = k_t[order], k_d[order], k_min[order]
    big = int(keys.max()) + 2
    comp = k_d * big + k_min
    first = np.searchsorted(comp, q_d * big, "left")
    count = np.searchsorted(comp, q_d * big + q_max, "right") - first
    rows = np.repeat(np.arange(q_t.size), count)
    cols = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
    nk = -(-keys.size // TILE)
    return int(np.unique(q_t[rows] * nk + k_t[cols]).size)


def te_layout(lengths, cp):
    """TE's THD split: per rank, (real attention work, computed tiles), and the padded length."""
    n = np.asarray(lengths, dtype=np.int64)
    c = -(-n // (2 * cp))  # chunk of the padded document
    work = np.zeros(cp, dtype=np.int64)
    for r in range(cp):
        for j in (r, 2 * cp - 1 - r):
            a, b = np.minimum(j * c, n), np.minimum((j + 1) * c, n)  # real tokens of chunk j
            work[r] += int(((b - a) * a + (b - a) * (b - a + 1) // 2).sum())
    diag = -(-2 * c // TILE)
    tiles = int((diag * (diag + 1) // 2 + (cp - 1) * diag * (-(-c // TILE))).sum())
    return work, np.full(cp, tiles), int((2 * cp * c).sum())


# ----------------------------------------------------------------------------------------------
# Time of the busiest rank's attention (GPU; --time-backends)
# ----------------------------------------------------------------------------------------------


def time_busiest_rank(lengths, order, cp, backend, *, device, heads, kv_heads, head_dim, dtype, iters, warmup,
                      old_flex=False):
    """Seconds of one forward+backward of the busiest rank's queries against all keys."""
    import torch

    from megatron_prolong.attention import portable
    from megatron_prolong.attention.flex import document_block_mask, flex_document_attention

    S = order.size
    local = S // cp
    r = int(np.argmax(rank_work(order, lengths, cp)))
    q_pos = torch.from_numpy(order[r * local:(r + 1) * local]).to(device)
    k_pos = torch.from_numpy(order).to(device)
    doc = torch.from_numpy(doc_maps(lengths)[0])[None].to(device)
    q = torch.randn(1, heads, local, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, S, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, S, head_dim, device=device, dtype=dtype, requires_grad=True)
    scale = 1 / math.sqrt(head_dim)
    portable.clear_caches()
    block_mask = document_block_mask(q_pos, k_pos, doc) if old_flex else None

    def step():
        q.grad = k.grad = v.grad = None
        if old_flex:
            out = flex_document_attention(q, k, v, block_mask, scale)
        else:
            out = portable.document_attention(q, k, v, doc, q_pos=q_pos, k_pos=k_pos, softmax_scale=scale,
                                              backend=backend)
        out.backward(torch.ones_like(out))

    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    portable.clear_caches()
    return (time.perf_counter() - t) / iters


def time_row(lengths, cp, rank_share, args) -> dict:
    import torch

    dtype = getattr(torch, args.time_dtype)
    out = {}
    for backend in args.time_backends:
        for name, order in (("old", zigzag_order(sum(lengths), cp)), ("new", balanced_order(lengths, cp, rank_share))):
            try:
                out[(backend, name)] = time_busiest_rank(
                    lengths, order, cp, backend, device=args.time_device, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, dtype=dtype, iters=args.iters, warmup=args.warmup,
                    old_flex=backend == "flex" and name == "old")
            except Exception as exc:  # a benchmark reports a failing kernel and goes on
                print(f"#   {backend} {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return out


# ----------------------------------------------------------------------------------------------
# One (length, mix, CP) row
# ----------------------------------------------------------------------------------------------


def portable_tiles(order, lengths, cp, new: bool):
    """Per rank: computed and holding tiles of each portable kernel under ``order``."""
    doc, start = doc_maps(lengths)
    S = order.size
    local = S // cp
    out = {k: np.zeros((cp, 2), dtype=np.int64) for k in ("varlen", "flex", "sdpa")}
    for r in range(cp):
        q = order[r * local:(r + 1) * local]
        v = varlen_tiles(q, start)
        out["varlen"][r] = (v, v)
        held = holding_tiles(q, order, doc)  # rank-major gathered keys: sdpa, old flex
        out["sdpa"][r] = (-(-local // TILE) * -(-S // TILE), held)
        if new:
            f = flex_ordered_tiles(q, start)
            out["flex"][r] = (f, f)
        else:
            out["flex"][r] = (flex_block_stat_tiles(q, order, doc, local), held)
    return out


def measure(S, mix, cp, samples, tile_samples, rank_share, rng):
    lens = [MIXES[mix](S, rng) for _ in range(samples)]
    res = {"bal": {k: [] for k in ("old", "new", "te")}, "need": 0, "te_padded": []}
    tiles = {k: {} for k in ("old", "new")}
    for i, lengths in enumerate(lens):
        orders = {"old": zigzag_order(S, cp), "new": balanced_order(lengths, cp, rank_share)}
        te_work, te_tiles, padded = te_layout(lengths, cp)
        for name, order in orders.items():
            w = rank_work(order, lengths, cp)
            res["bal"][name].append(w.max() / w.mean())
        res["bal"]["te"].append(te_work.max() / te_work.mean())
        res["te_padded"].append(padded)
        if i >= tile_samples:
            continue
        res["need"] += int(doc_work(lengths).sum())
        for name, order in orders.items():
            for kernel, t in portable_tiles(order, lengths, cp, name == "new").items():
                acc = tiles[name].setdefault(kernel, {"max": 0, "sum": 0, "held": 0})
                acc["max"] += int(t[:, 0].max())
                acc["sum"] += int(t[:, 0].sum())
                acc["held"] += int(t[:, 1].sum())
        acc = tiles["new"].setdefault("te", {"max": 0, "sum": 0, "held": 0})
        acc["max"] += int(te_tiles.max())
        acc["sum"] += int(te_tiles.sum())
        acc["held"] += int(te_tiles.sum())
    res["tiles"] = tiles
    res["docs"] = float(np.mean([len(x) for x in lens]))
    res["first_sample"] = lens[0]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lengths", type=int, nargs="+", default=[65536, 524288])
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--samples", type=int, default=20, help="samples per row for the balance")
    ap.add_argument("--tile-samples", type=int, default=2, help="of those, samples whose tiles are counted")
    ap.add_argument("--rank-shares", type=float, nargs="+", default=[RANK_SHARE],
                    help="balanced_order's rank_share (the new layout); several: one block each")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-backends", nargs="+", default=[], choices=["flex", "varlen", "fa4", "sdpa"],
                    help="also time the busiest rank's attention, old split vs new (GPU)")
    ap.add_argument("--time-device", default="cuda")
    ap.add_argument("--time-dtype", default="bfloat16")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)

    per_token = 2 * args.kv_heads * args.head_dim * 2 / args.tp  # K and V, bf16
    rows = []
    for share in args.rank_shares:
        print(f"# new layout: balanced_order(rank_share={share}); tiles 128x128 over {args.tile_samples} of "
              f"{args.samples} samples; K/V per rank per layer: {args.kv_heads} kv heads x {args.head_dim} bf16, "
              f"TP {args.tp}")
        print(f"{'seq':>7} {'mix':>8} {'docs':>5} {'cp':>3} | {'max/mean old':>14} {'new':>13} {'te':>13} | "
              f"{'varlen tiles':>12} {'dens old/new':>12} | {'flex tiles':>10} {'dens old/new':>12} "
              f"{'hold old/new':>12} | {'sdpa hold o/n':>13} | {'te tiles':>8} {'dens':>5} | "
              f"{'K/V GiB ag':>10} {'te':>6}")
        for S in args.seq_lengths:
            for mix in args.mixes:
                for cp in args.cp:
                    t0 = time.perf_counter()
                    rng = np.random.default_rng(args.seed)
                    r = measure(S, mix, cp, args.samples, min(args.tile_samples, args.samples), share, rng)
                    r.update(seq=S, mix=mix, cp=cp, rank_share=share, seconds=time.perf_counter() - t0)
                    rows.append(r)
                    print(_line(r, per_token), flush=True)
                    if args.time_backends:
                        r["times"] = time_row(r["first_sample"], cp, share, args)
                        print("#   busiest rank f+b ms, old -> new: " + ", ".join(
                            f"{b} {r['times'][(b, 'old')] * 1e3:.1f} -> {r['times'][(b, 'new')] * 1e3:.1f}"
                            for b in args.time_backends if (b, "old") in r["times"] and (b, "new") in r["times"]),
                            flush=True)
    return rows


def _line(r, per_token):
    S, cp, t = r["seq"], r["cp"], r["tiles"]
    bal = {k: (np.mean(v), np.max(v)) for k, v in r["bal"].items()}
    dens = lambda acc: r["need"] / (acc["sum"] * TILE * TILE)  # noqa: E731
    rel = lambda k: t["new"][k]["max"] / t["old"][k]["max"]  # noqa: E731
    hold = lambda acc: acc["held"] / acc["sum"]  # noqa: E731
    gathered = (cp - 1) * (S // cp) * per_token / 2**30
    te_gathered = (cp - 1) * np.mean(r["te_padded"]) / cp * per_token / 2**30
    te_rel = t["new"]["te"]["max"] / t["old"]["varlen"]["max"]
    return (f"{S:>7} {r['mix']:>8} {r['docs']:>5.0f} {cp:>3} | {bal['old'][0]:>6.3f} ({bal['old'][1]:.2f}) "
            f"{bal['new'][0]:>6.3f} ({bal['new'][1]:.2f}) {bal['te'][0]:>6.3f} ({bal['te'][1]:.2f}) | "
            f"{rel('varlen'):>12.2f} {dens(t['old']['varlen']):>5.2f}/{dens(t['new']['varlen']):<6.2f} | "
            f"{rel('flex'):>10.2f} {dens(t['old']['flex']):>5.2f}/{dens(t['new']['flex']):<6.2f} "
            f"{hold(t['old']['flex']):>5.2f}/{hold(t['new']['flex']):<6.2f} | "
            f"{hold(t['old']['sdpa']):>6.3f}/{hold(t['new']['sdpa']):<6.3f} | {te_rel:>13.2f} "
            f"{dens(t['new']['te']):>5.2f} | {gathered:>10.2f} {te_gathered:>6.2f}")


if __name__ == "__main__":
    main()
