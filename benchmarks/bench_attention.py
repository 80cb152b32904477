#!/usr/bin/env python
"""Throughput of the portable document-masked attention vs plain causal SDPA on the same device.

TFLOP/s count only allowed (query, key) pairs ("unmasked FLOPs"): forward = 4 * d * pairs * heads
(QK^T and PV), forward+backward = 3.5x forward (backward = 2.5x forward, the flash-attention
convention). Document mixtures are drawn from ProLong-like length distributions.

    python benchmarks/bench_attention.py                                 # GPU: 64K and 128K, llama3-8b heads
    python benchmarks/bench_attention.py --seq-length 4096 --heads 8 --kv-heads 2 --iters 2   # CPU check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_prolong.attention.portable import document_attention  # noqa: E402

MIXTURES = {
    # one document filling the sequence (a long book / code repo)
    "single": lambda S, g: [S],
    # ProLong stage-1 style: 60% long (>= S/2) documents, the rest short web text
    "prolong": lambda S, g: _mix(S, g, long_frac=0.6),
    # short data only: documents of ~0.5K-8K tokens (log-uniform)
    "short": lambda S, g: _mix(S, g, long_frac=0.0),
}


def _mix(S, g, long_frac):
    lens, left = [], S
    if long_frac > 0:
        first = int(S * long_frac)
        lens.append(first)
        left -= first
    while left > 0:
        n = int(math.exp(torch.empty(1).uniform_(math.log(512), math.log(8192), generator=g).item()))
        n = min(n, left)
        lens.append(n)
        left -= n
    return lens


def doc_ids_for(lengths, device):
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))[None]


def timeit(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-length", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--mixture", nargs="+", default=["single", "prolong", "short"], choices=sorted(MIXTURES))
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "flex", "sdpa"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    H, KV, D = args.heads, args.kv_heads, args.head_dim
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"heads {H}/{KV} kv, head_dim {D}, backend {args.backend}, torch {torch.__version__}")
    hdr = f"{'seq':>8} {'mixture':>8} {'docs':>5} {'kernel':>14} {'fwd ms':>9} {'fwd TF/s':>9}"
    if not args.no_backward:
        hdr += f" {'f+b ms':>9} {'f+b TF/s':>9}"
    print(hdr)
    for S in args.seq_length:
        q = torch.randn(1, H, S, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, KV, S, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, KV, S, D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.arange(S, device=device)
        scale = 1 / math.sqrt(D)
        kernels = []
        for mix in args.mixture:
            lens = MIXTURES[mix](S, g)
            doc = doc_ids_for(lens, device)
            pairs = sum(n * (n + 1) // 2 for n in lens)
            kernels.append((mix, len(lens), f"portable", pairs,
                            lambda doc=doc: document_attention(q, k, v, doc, q_pos=pos, k_pos=pos,
                                                               softmax_scale=scale, backend=args.backend)))
        kernels.append(("causal", 1, "sdpa-causal", S * (S + 1) // 2,
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True, scale=scale, enable_gqa=True)))
        for mix, ndocs, name, pairs, fn in kernels:
            fwd_flops = 4 * D * pairs * H
            with torch.no_grad():
                t_f = timeit(fn, args.iters, args.warmup, device)
            line = f"{S:>8} {mix:>8} {ndocs:>5} {name:>14} {t_f * 1e3:>9.2f} {fwd_flops / t_f / 1e12:>9.3f}"
            if not args.no_backward:
                def fb():
                    out = fn()
                    out.backward(torch.ones_like(out))
                t_fb = timeit(fb, args.iters, args.warmup, device)
                line += f" {t_fb * 1e3:>9.2f} {3.5 * fwd_flops / t_fb / 1e12:>9.3f}"
            print(line, flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
