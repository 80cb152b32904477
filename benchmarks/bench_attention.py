#!/usr/bin/env python
"""Forward+backward time of the portable document-masked attention kernels next to plain causal
attention (SDPA ``is_causal``: FlashAttention on GPUs) on the same device.

FLOPs (stated per row, in GFLOP): forward = 4 * head_dim * heads * pairs (QK^T and PV, 2 FLOPs per
multiply-add), forward+backward = 3.5x forward (backward = 2.5x forward, the FlashAttention
convention). ``pairs`` is what the mask allows: for document masking the sum over documents of
n(n+1)/2 (the FLOPs document masking actually needs; TFLOP/s are on these), for causal attention
S(S+1)/2 (the causal-dense count). ``vs causal`` = the document-masked time / the causal time on
the same length (target: <= 1.3 at 64K). The mask / block mask / cu_seqlens are built once per
micro-batch and shared by all layers: ``prep ms`` times that build, apart from the kernel.

Mixtures (ProLong-like, scaled with S): ``prolong``: one document of 60% of S, the rest short
(log-uniform S/128..S/8: 0.5K-8K tokens at 64K); ``short``: short documents only; ``single``: one
document filling the sequence.

    python benchmarks/bench_attention.py                     # GPU: 64K and 128K, llama3-8b heads, bf16
    python benchmarks/bench_attention.py --backends flex varlen --mixtures prolong
    python benchmarks/bench_attention.py --device cpu --seq-lengths 256 --heads 4 --kv-heads 2 \\
        --head-dim 16 --iters 1 --warmup 0                      # CPU smoke run (sdpa only)
"""

from __future__ import annotations

import argparse
import math
import time

import torch


from megatron_prolong.attention import portable
from megatron_prolong.attention.backends import unavailable_reason
from megatron_prolong.attention.flex import document_block_mask
from megatron_prolong.attention.varlen import varlen_plan

MIXTURES = {
    "single": lambda S, g: [S],
    "prolong": lambda S, g: _mix(S, g, long_frac=0.6),
    "short": lambda S, g: _mix(S, g, long_frac=0.0),
}

PREP = {  # what each kernel builds once per micro-batch (doc ids, positions) -> layout
    "sdpa": lambda doc, pos: portable.sdpa_mask(pos, pos, doc),
    "flex": lambda doc, pos: document_block_mask(pos, pos, doc),
    "varlen": lambda doc, pos: varlen_plan(doc, pos, pos, doc.shape[0]),
    "fa4": lambda doc, pos: varlen_plan(doc, pos, pos, doc.shape[0]),
}


def _mix(S, g, long_frac):
    lens, left = [], S
    if long_frac > 0:
        lens.append(int(S * long_frac))
        left -= lens[0]
    lo, hi = max(1, S // 128), max(2, S // 8)
    while left > 0:
        n = min(left, int(math.exp(torch.empty(1).uniform_(math.log(lo), math.log(hi), generator=g).item())))
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


def fwd_flops(pairs, heads, head_dim):
    return 4 * head_dim * heads * pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--mixtures", nargs="+", default=["prolong", "short", "single"], choices=sorted(MIXTURES))
    ap.add_argument("--backends", nargs="+", default=None, choices=sorted(PREP),
                    help="default: every available one (CUDA: flex varlen fa4; CPU: sdpa)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    H, KV, D = args.heads, args.kv_heads, args.head_dim
    wanted = args.backends or (["flex", "varlen", "fa4"] if cuda else ["sdpa"])
    backends = []
    for b in wanted:
        reason = unavailable_reason(b, cuda=cuda)
        if reason:
            print(f"# skipped {b}: {reason}")
        else:
            backends.append(b)
    print(f"# device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), torch {torch.__version__}, "
          f"{dtype}, heads {H} q / {KV} kv, head_dim {D}, forward+backward, {args.iters} iters")
    print("# GFLOP f+b = 3.5 x 4 x head_dim x heads x allowed pairs; 'needed': document-masked pairs, "
          "'causal': S(S+1)/2; TF/s on the needed FLOPs")
    print(f"{'seq':>7} {'mixture':>8} {'docs':>5} {'kernel':>12} {'GF needed':>10} {'GF causal':>10} "
          f"{'prep ms':>8} {'f+b ms':>9} {'TF/s':>7} {'vs causal':>9}")
    g = torch.Generator().manual_seed(0)
    rows = []
    for S in args.seq_lengths:
        q = torch.randn(1, H, S, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(1, KV, S, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(1, KV, S, D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.arange(S, device=device)
        scale = 1 / math.sqrt(D)
        causal_flops = 3.5 * fwd_flops(S * (S + 1) // 2, H, D)

        def step(fn):
            q.grad = k.grad = v.grad = None  # no gradient accumulation in the timing
            out = fn()
            out.backward(torch.ones_like(out))

        t_causal = timeit(lambda: step(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=H != KV)), args.iters, args.warmup, device)
        rows.append(dict(seq=S, mixture="causal", kernel="sdpa-causal", ms=t_causal * 1e3, ratio=1.0))
        print(f"{S:>7} {'causal':>8} {1:>5} {'sdpa-causal':>12} {causal_flops / 1e9:>10.1f} "
              f"{causal_flops / 1e9:>10.1f} {'-':>8} {t_causal * 1e3:>9.2f} {causal_flops / t_causal / 1e12:>7.2f} "
              f"{1.0:>9.2f}", flush=True)
        for mix in args.mixtures:
            lens = MIXTURES[mix](S, g)
            doc = doc_ids_for(lens, device)
            needed = 3.5 * fwd_flops(sum(n * (n + 1) // 2 for n in lens), H, D)
            for backend in backends:
                try:
                    t_prep = timeit(lambda: PREP[backend](doc, pos), 1, 1, device)
                    portable.clear_caches()
                    t = timeit(lambda: step(lambda: portable.document_attention(
                        q, k, v, doc, q_pos=pos, k_pos=pos, softmax_scale=scale, backend=backend)),
                        args.iters, args.warmup, device)
                except Exception as exc:  # a benchmark reports a failing kernel and goes on
                    print(f"{S:>7} {mix:>8} {len(lens):>5} {backend:>12} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]}", flush=True)
                    rows.append(dict(seq=S, mixture=mix, kernel=backend, error=repr(exc)))
                    continue
                rows.append(dict(seq=S, mixture=mix, kernel=backend, ms=t * 1e3, ratio=t / t_causal))
                print(f"{S:>7} {mix:>8} {len(lens):>5} {backend:>12} {needed / 1e9:>10.1f} "
                      f"{causal_flops / 1e9:>10.1f} {t_prep * 1e3:>8.2f} {t * 1e3:>9.2f} "
                      f"{needed / t / 1e12:>7.2f} {t / t_causal:>9.2f}", flush=True)
        q = k = v = None  # free the inputs before the next, longer sequence
        portable.clear_caches()
    return rows


if __name__ == "__main__":
    main()
