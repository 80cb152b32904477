#!/usr/bin/env python
"""Benchmark the data pipeline against mosaicml-streaming on the same synthetic ProLong shards.

1. MDS -> indexed conversion (``tools/mds_to_indexed.py`` engine) vs. a bare read of all samples
   with streaming's own ``LocalDataset`` (target: conversion within 2x of the bare read).
2. Training loader (``PackedDataset``: random access by global sample index, documents packed with
   boundaries and loss masks) at 64K and 512K tokens per sample, vs. streaming's ``LocalDataset``
   reading the same number of tokens as packed 64K samples (target: >= 10 samples/s at 512K on
   one core).

The shards are generated (ProLong schema: uint32 ``input_ids``, ``length``, ``domain``, ``indices``
of the packed documents) in a temporary folder and removed afterwards.

    python tools/bench_data.py              # 128 MB of tokens
    python tools/bench_data.py --mb 32      # quicker
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prolong.data.indexed import quiet_library_warnings  # noqa: E402

PACKED = 65536  # tokens per packed MDS sample, as in ProLong's 64K data


def make_shards(out: Path, total_tokens: int, seed: int = 0) -> int:
    """ProLong-style packed shards; returns the number of documents written."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    cols = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str", "indices": "ndarray:uint32"}
    n_docs = 0
    with MDSWriter(out=str(out), columns=cols, size_limit=1 << 26) as w:
        for k in range(max(1, total_tokens // PACKED)):
            # Mixed document lengths: many short web-like documents, a few long ones.
            lens = []
            while sum(lens) < PACKED:
                lens.append(int(min(rng.lognormal(7.0, 1.5) + 1, PACKED)))
            lens[-1] -= sum(lens) - PACKED
            if lens[-1] == 0:
                lens.pop()
            bounds = np.concatenate([[0], np.cumsum(lens)]).astype(np.uint32)
            w.write({"input_ids": rng.integers(0, 128256, PACKED, dtype=np.uint32), "length": PACKED,
                     "domain": ("book-65536", "fineweb-edu")[k % 2],
                     "indices": np.stack([bounds[:-1], bounds[1:]], 1)})
            n_docs += len(lens)
    return n_docs


def bare_read(mds: Path) -> tuple[float, int]:
    """Seconds to read every sample with streaming's LocalDataset, and tokens read."""
    from streaming import LocalDataset

    t = time.perf_counter()
    ds = LocalDataset(local=str(mds))
    tokens = 0
    for i in range(len(ds)):
        s = ds[i]
        tokens += len(s["input_ids"]) + len(s["indices"])
    return time.perf_counter() - t, tokens


def streaming_rate(mds: Path, seq_length: int, seconds: float = 2.0) -> float:
    """Samples/s of ``seq_length`` tokens when reading packed 64K samples with LocalDataset."""
    from streaming import LocalDataset

    ds = LocalDataset(local=str(mds))
    t, tokens, i = time.perf_counter(), 0, 0
    while time.perf_counter() - t < seconds:
        s = ds[i % len(ds)]
        tokens += len(np.asarray(s["input_ids"], dtype=np.int64))  # as a loader would convert
        i += 1
    return tokens / seq_length / (time.perf_counter() - t)


def raw_write(out_dir: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to ``out_dir`` with plain buffered writes: the I/O floor of
    any conversion that writes its output there (read from page cache is much faster)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    block = np.zeros(1 << 24, dtype=np.uint8)
    t = time.perf_counter()
    with open(out_dir / "raw.bin", "wb") as f:
        for _ in range(nbytes // block.nbytes):
            f.write(block)
        f.write(block[: nbytes % block.nbytes])
    seconds = time.perf_counter() - t
    (out_dir / "raw.bin").unlink()
    return seconds


def loader_rate(prefix: str, seq_length: int, samples: int) -> float:
    from megatron_prolong.data import PackedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small synthetic data repeats
        ds = PackedDataset(prefix, seq_length, samples, seed=0)
        ds[0]  # page in
        t = time.perf_counter()
        for i in range(samples):
            s = ds[i]
            assert s["tokens"].shape == (seq_length,)
    return samples / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=128, help="size of the synthetic shards in MB of tokens (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="workers for the second conversion run")
    p.add_argument("--samples", type=int, default=40, help="loader samples timed per length")
    p.add_argument("--workdir", default=None, help="where to put shards (default: a temp folder)")
    p.add_argument("--all-cores", action="store_true", help="do not pin the loader to one core")
    args = p.parse_args(argv)
    quiet_library_warnings()
    from megatron_prolong.data.mds import ConvertOptions, convert_mds
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (one-time import, not throughput)

    work = Path(tempfile.mkdtemp(prefix="bench_data.", dir=args.workdir))
    try:
        mds = work / "mds"
        t = time.perf_counter()
        n_docs = make_shards(mds, int(args.mb * 1e6 / 4))
        size = sum(f.stat().st_size for f in mds.iterdir()) / 1e6
        print(f"synthetic shards: {size:.0f} MB, {n_docs:,} documents ({time.perf_counter() - t:.1f} s to write)")
        bare_read(mds)  # warm the page cache so both sides read from memory
        read_s, _ = bare_read(mds)
        t = time.perf_counter()
        summary = convert_mds([str(mds)], str(work / "out" / "bench"), ConvertOptions(split_by_domain=False))
        conv_s = time.perf_counter() - t
        assert summary["documents"] == n_docs
        write_s = raw_write(work / "raw", summary["tokens"] * 4)
        t = time.perf_counter()
        convert_mds([str(mds)], str(work / "out2" / "bench"), ConvertOptions(split_by_domain=True),
                    workers=args.workers)
        conv2_s = time.perf_counter() - t
        prefix = str(work / "out" / "bench")
        if not args.all_cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        rows = [("MDS -> indexed", f"{summary['tokens'] / conv_s / 1e6:.0f} M tok/s",
                 f"{summary['tokens'] / read_s / 1e6:.0f} M tok/s (LocalDataset read)",
                 f"{conv_s / read_s:.2f}x time", "<= 2x"),
                ("  vs read + raw write of the output", "",
                 f"{read_s + write_s:.2f} s ({write_s:.2f} s writing {summary['tokens'] * 4 / 1e6:.0f} MB)",
                 f"{conv_s / (read_s + write_s):.2f}x time", ""),
                (f"  (--workers {args.workers} --split-by-domain)",
                 f"{summary['tokens'] / conv2_s / 1e6:.0f} M tok/s", "", f"{conv2_s / read_s:.2f}x time", "")]
        for seq, name in ((65536, "64K"), (524288, "512K")):
            ours = loader_rate(prefix, seq, args.samples)
            base = streaming_rate(mds, seq)
            rows.append((f"loader {name}", f"{ours:.1f} samples/s", f"{base:.1f} samples/s (LocalDataset)",
                         f"{ours / base:.2f}x rate", ">= 10/s" if name == "512K" else ""))
        widths = [max(len(r[c]) for r in rows + [("what", "ours", "baseline", "ratio", "target")])
                  for c in range(5)]
        for r in [("what", "ours", "baseline", "ratio", "target")] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
        print(f"(conversion {conv_s:.2f} s vs bare read {read_s:.2f} s; loader pinned to one core: "
              f"{not args.all_cores})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
