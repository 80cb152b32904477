#!/usr/bin/env python
"""How long a checkpoint save stops training: synchronous vs background (``checkpoint.async_save``).

    python benchmarks/bench_checkpoint_save.py --model llama3-tiny                 # weights + optimizer, fp32
    python benchmarks/bench_checkpoint_save.py --model llama3.2-1b --weights-only --precision bf16

One process (CPU, gloo), the trainer's own save path (``Checkpointer.maybe_save``): after one
warm-up save (one-time costs: megatron's first plan, the writer-report process), each mode saves
``--saves`` times into a fresh directory. Reported per save: the *stall* (how long ``maybe_save``
blocks the step loop) and, for background saves, the time until the checkpoint is complete
(written and finalised). ``--weights-only`` saves the model without optimizer state (for models
whose Adam state would not fit this machine's memory); with optimizer state the model takes one
training step first (the state exists only after a step).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--weights-only", action="store_true")
    parser.add_argument("--optimizer-format", default="fully_reshardable",
                        choices=["fully_reshardable", "dp_reshardable"])
    parser.add_argument("--saves", type=int, default=1, help="saves per mode (after the warm-up)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.platform import quiet_known_warnings
    from megatron_prolong.training.checkpoint import Checkpointer
    from megatron_prolong.training.checkpoint_integrity import total_size
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer, build_scheduler

    quiet_known_warnings()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    cfg = load_config(None, [f"model.name={args.model}", "data.mock=true", "train.device=cpu",
                             f"train.precision={args.precision}", "train.seq_length=64", "train.global_batch_size=1",
                             f"train.steps={10 * (args.saves + 2)}", f"checkpoint.save_dir={root / 'warmup'}",
                             f"checkpoint.optimizer_format={args.optimizer_format}"])
    run = resolve_run(cfg)
    model = build_model(cfg, run)
    optimizer = scheduler = None
    if not args.weights_only:
        optimizer, scheduler = build_optimizer(cfg, run, model), None
        scheduler = build_scheduler(cfg, optimizer)
        _one_step(cfg, run, model, optimizer, scheduler)
    what = "weights" if args.weights_only else f"weights + optimizer state ({args.optimizer_format})"
    print(f"{args.model} ({run.spec.num_parameters() / 1e6:.1f}M parameters, {args.precision}), {what}, "
          f"torch threads {__import__('torch').get_num_threads()}", flush=True)

    results = {}
    step = 0
    for mode in ("warmup", "sync", "async"):
        save_dir = root / mode
        shutil.rmtree(save_dir, ignore_errors=True)
        cfg.checkpoint.save_dir = str(save_dir)
        cfg.checkpoint.async_save = mode == "async"
        cfg.checkpoint.save_interval = 1  # a periodic save (a forced one is always synchronous)
        checkpointer = Checkpointer(cfg, run, model, optimizer, scheduler)
        checkpointer.restore() if mode == "warmup" else None  # starts the writer-report process once
        rows = []
        for _ in range(1 if mode == "warmup" else args.saves):
            step += 1
            t0 = time.time()
            path = checkpointer.maybe_save(step, consumed_samples=step)
            stall = time.time() - t0
            checkpointer.wait()
            rows.append((stall, time.time() - t0, total_size(path)))
        results[mode] = rows
    destroy()
    for mode, rows in results.items():
        for stall, done, size in rows:
            print(f"  {mode:>6}: stall {stall:6.2f} s | complete after {done:6.2f} s | {size / 1e9:.2f} GB", flush=True)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _one_step(cfg, run, model, optimizer, scheduler) -> None:
    from megatron_prolong.data import build_train_dataset
    from megatron_prolong.training.step import train_step
    from megatron_prolong.training.trainer import step_batches

    t = cfg.train
    dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed, vocab_size=run.spec.vocab_size,
                                  num_samples=t.global_batch_size)
    train_step(model, optimizer, scheduler, step_batches(cfg, run, dataset, 0, None), num_microbatches=1,
               seq_length=t.seq_length, micro_batch_size=1, global_batch_size=1, device=run.device)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
