#!/usr/bin/env python
"""Known-answer check of the retrieval harness: train llama3-debug on synthetic key-value needles
(CPU, the real trainer), then score the untrained and trained checkpoints with tools/evaluate.py's
harness at the trained context and beyond it. Prints a table; not pass/fail.

    python benchmarks/bench_retrieval.py                      # 1 needle, 300 steps, lengths 64,128,256
    python benchmarks/bench_retrieval.py --num-needles 2 --steps 1500
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-needles", type=int, default=1, help="needles per case (1 asked, the rest distractors)")
    p.add_argument("--seq-length", type=int, default=64, help="trained context")
    p.add_argument("--lengths", default="64,128,256", help="evaluated contexts (beyond --seq-length: extrapolation)")
    p.add_argument("--samples-per-cell", type=int, default=32)
    p.add_argument("--workdir", default=None, help="keep data and checkpoints here (default: a temporary folder)")
    args = p.parse_args()

    from megatron_prolong.platform import quiet_known_warnings
    from megatron_prolong.eval.known_answer import score_retrieval, train_known_answer_model
    from megatron_prolong.parallel import destroy

    quiet_known_warnings()
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        t0 = time.time()
        run = train_known_answer_model(root, steps=args.steps, seq_length=args.seq_length,
                                       num_needles=args.num_needles)
        train_s = time.time() - t0
        rows = {name: score_retrieval(path, lengths=lengths, num_needles=args.num_needles,
                                      samples_per_cell=args.samples_per_cell, extra=["--allow-extrapolation"])
                for name, path in (("untrained", run.untrained), ("trained", run.trained))}
        destroy()
    first, last = run.losses[0], sum(run.losses[-10:]) / len(run.losses[-10:])
    print(f"\ntrained {args.steps} steps in {train_s:.0f} s: loss {first:.3f} -> {last:.3f} (last 10 steps); "
          f"{args.num_needles} needle(s), chance {1 / run.span:.3f} (1 of {run.span} values)")
    print(f"{'model':>10} {'length':>7} {'exact_match':>12} {'choice_acc':>11} {'answer_logprob':>15}")
    for name, res in rows.items():
        for n in lengths:
            m = {k: res["by_length"][k][str(n)] for k in ("exact_match", "choice_accuracy", "answer_logprob")}
            print(f"{name:>10} {n:>7} {m['exact_match']:>12.3f} {m['choice_accuracy']:>11.3f} "
                  f"{m['answer_logprob']:>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
