"""Predict per-GPU memory of a long-context training layout and suggest layouts that fit.

    python tools/plan_memory.py --model llama3-8b --seq-length 524288 --tp 1 --pp 1 --cp 8 --dp 1
    python tools/plan_memory.py --model llama3-8b --seq-length 524288 --gpus 8 --gpu-memory 80

Formulas: megatron_prolong/memory_plan.py and docs/long_context.md. "act" holds the resident
activations plus one layer's transient ones; the peak adds the larger of the loss head and that
layer's backward on top (they happen at different times).
"""

from __future__ import annotations

import argparse


from megatron_prolong.memory_plan import GiB, Layout, MemoryOptions, estimate, search_layouts
from megatron_prolong.models.registry import get_model_spec


def _row(est, fits=None):
    g = est.as_gib()
    l = est.layout
    mark = "" if fits is None else ("fits" if fits else "OOM")
    return (f"tp={l.tp:<2} pp={l.pp:<2} cp={l.cp:<3} dp={l.dp:<3} | weights {g['weights']:6.2f} grads {g['grads']:6.2f} "
            f"optim {g['optimizer']:6.2f} act {g['activations']:7.2f} (kv {g['gathered_kv']:6.2f}) loss head "
            f"{g['logits']:6.2f} layer bwd {g['backward']:5.2f} ovh {g['overhead']:4.1f} ckpt save "
            f"{g['checkpoint_staging']:4.2f} | peak {g['total']:7.2f} GiB "
            f"{mark}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--seq-length", type=int, default=524288)
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--cp", type=int)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--gpus", type=int, help="search layouts for this many GPUs")
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--num-microbatches", type=int, default=16)
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    ap.add_argument("--no-sequence-parallel", action="store_true")
    ap.add_argument("--loss-chunk-tokens", type=int, default=2048)
    ap.add_argument("--attention-backend", choices=["flex", "varlen", "fa4", "te", "sdpa"], default="flex")
    ap.add_argument("--overhead-gib", type=float, default=3.0)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)

    spec = get_model_spec(args.model)
    opt = MemoryOptions(seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                        num_microbatches=args.num_microbatches, sequence_parallel=not args.no_sequence_parallel,
                        recompute=args.recompute, loss_chunk_tokens=args.loss_chunk_tokens,
                        attention_backend=args.attention_backend, overhead_gib=args.overhead_gib)
    print(f"model {spec.name}: {spec.num_parameters() / 1e9:.2f}B params, seq {args.seq_length}, recompute "
          f"{opt.recompute}, SP {opt.sequence_parallel}, loss chunk {opt.loss_chunk_tokens}, GPU {args.gpu_memory} GiB")
    if args.tp or args.pp or args.cp:
        lay = Layout(args.tp or 1, args.pp or 1, args.cp or 1, args.dp)
        est = estimate(spec, lay, opt)
        print(_row(est, est.total <= args.gpu_memory * GiB))
    gpus = args.gpus
    if gpus is None and not (args.tp or args.pp or args.cp):
        gpus = 8
    if gpus:
        print(f"\nlayouts for {gpus} GPUs (best first):")
        for est, fits in search_layouts(spec, gpus, args.gpu_memory, opt)[: args.top]:
            print(_row(est, fits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
