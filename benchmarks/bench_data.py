#!/usr/bin/env python
"""Benchmark the data pipeline against mosaicml-streaming on the same synthetic ProLong shards.

1. MDS -> indexed conversion (``tools/mds_to_indexed.py`` engine) vs. a bare read of all samples
   with streaming's own ``LocalDataset`` (target: conversion within 2x of the bare read); the same
   at ``--workers N``, and from zstd-compressed copies of the shards (read without decompressing
   them to disk), at 1 and N workers. Conversions are timed ``--repeat`` times, best kept (other
   work on the machine only ever slows a run down). The parallel ceiling (pure-Python CPU burns
   in N processes vs one after the other) says what speed-up the machine allows at that moment.
2. Training loader (``PackedDataset``: random access by global sample index, documents packed with
   boundaries and loss masks) at 64K and 512K tokens per sample, vs. streaming's ``LocalDataset``
   reading the same number of tokens as packed 64K samples (target: >= 10 samples/s at 512K on
   one core).

The shards are generated (ProLong schema: uint32 ``input_ids``, ``length``, ``domain``, ``indices``
of the packed documents) in a temporary folder and removed afterwards.

    python benchmarks/bench_data.py              # 128 MB of tokens
    python benchmarks/bench_data.py --mb 32      # quicker
    python benchmarks/bench_data.py --mb 400 --skip-loader --repeat 3   # conversion only, 1 vs 2 workers
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


from megatron_prolong.platform import quiet_known_warnings

PACKED = 65536  # tokens per packed MDS sample, as in ProLong's 64K data


def make_shards(out: Path, total_tokens: int, seed: int = 0, compression: str | None = None) -> int:
    """ProLong-style packed shards (64 MB each, as released); returns the number of documents."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    cols = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str", "indices": "ndarray:uint32"}
    n_docs = 0
    with MDSWriter(out=str(out), columns=cols, size_limit=1 << 26, compression=compression) as w:
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


def _burn(n: int = 4_000_000) -> None:
    s = 0
    for i in range(n):
        s += i


def parallel_ceiling(workers: int) -> float:
    """Speed-up of ``workers`` pure-Python CPU burns run in ``workers`` processes over running them
    one after the other: what this machine gives this session in parallel right now (on a shared
    machine with per-session CPU fair share, 1.0x: no worker count can be faster)."""
    import multiprocessing as mp

    t = time.perf_counter()
    for _ in range(workers):
        _burn()
    serial = time.perf_counter() - t
    t = time.perf_counter()
    procs = [mp.get_context("fork").Process(target=_burn) for _ in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return serial / (time.perf_counter() - t)


def convert_seconds(mds: Path, out: Path, workers: int, repeat: int) -> tuple[float, dict]:
    """Best wall time of ``repeat`` conversions (outputs deleted after each) and the summary."""
    from megatron_prolong.data.mds import ConvertOptions, convert_mds

    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        summary = convert_mds([str(mds)], str(out / "bench"), ConvertOptions(split_by="none"), workers=workers)
        best = min(best, time.perf_counter() - t)
        shutil.rmtree(out)
    return best, summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=128, help="size of the synthetic shards in MB of tokens (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="workers for the parallel conversion runs")
    p.add_argument("--repeat", type=int, default=1, help="conversions timed per setting, best kept")
    p.add_argument("--samples", type=int, default=40, help="loader samples timed per length")
    p.add_argument("--skip-loader", action="store_true", help="time the conversions only")
    p.add_argument("--workdir", default=None, help="where to put shards (default: a temp folder)")
    p.add_argument("--all-cores", action="store_true", help="do not pin the loader to one core")
    args = p.parse_args(argv)
    quiet_known_warnings()
    from megatron_prolong.data.mds import ConvertOptions, convert_mds
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (one-time import, not throughput)

    work = Path(tempfile.mkdtemp(prefix="bench_data.", dir=args.workdir))
    try:
        mds, zst = work / "mds", work / "mds_zstd"
        t = time.perf_counter()
        n_docs = make_shards(mds, int(args.mb * 1e6 / 4))
        make_shards(zst, int(args.mb * 1e6 / 4), compression="zstd")
        size = sum(f.stat().st_size for f in mds.iterdir()) / 1e6
        zsize = sum(f.stat().st_size for f in zst.iterdir()) / 1e6
        print(f"synthetic shards: {size:.0f} MB in {len(list(mds.glob('*.mds')))} shards ({zsize:.0f} MB as zstd), "
              f"{n_docs:,} documents ({time.perf_counter() - t:.1f} s to write)")
        bare_read(mds)  # warm the page cache so both sides read from memory
        read_s, _ = bare_read(mds)
        conv_s, summary = convert_seconds(mds, work / "out", 1, args.repeat)
        assert summary["documents"] == n_docs
        write_s = raw_write(work / "raw", summary["tokens"] * 4)
        ceiling = parallel_ceiling(args.workers)
        conv2_s, _ = convert_seconds(mds, work / "out", args.workers, args.repeat)
        zconv_s, _ = convert_seconds(zst, work / "out", 1, args.repeat)
        zconv2_s, _ = convert_seconds(zst, work / "out", args.workers, args.repeat)
        rate = lambda s: f"{summary['tokens'] / s / 1e6:.0f} M tok/s"  # noqa: E731
        rows = [("MDS -> indexed", rate(conv_s), f"{rate(read_s)} (LocalDataset read)",
                 f"{conv_s / read_s:.2f}x time", "<= 2x"),
                ("  vs read + raw write of the output", "",
                 f"{read_s + write_s:.2f} s ({write_s:.2f} s writing {summary['tokens'] * 4 / 1e6:.0f} MB)",
                 f"{conv_s / (read_s + write_s):.2f}x time", ""),
                (f"  --workers {args.workers}", rate(conv2_s), "1 worker", f"{conv_s / conv2_s:.2f}x speed-up",
                 f"ceiling {ceiling:.2f}x"),
                ("  zstd shards", rate(zconv_s), "raw shards, 1 worker", f"{conv_s / zconv_s:.2f}x rate", ""),
                (f"  zstd shards, --workers {args.workers}", rate(zconv2_s), "zstd, 1 worker",
                 f"{zconv_s / zconv2_s:.2f}x speed-up", "")]
        if not args.skip_loader:
            prefix = str(work / "loader" / "bench")
            convert_mds([str(mds)], prefix, ConvertOptions(split_by="none"))
            if not args.all_cores and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
            for seq, name in ((65536, "64K"), (524288, "512K")):
                ours = loader_rate(prefix, seq, args.samples)
                base = streaming_rate(mds, seq)
                rows.append((f"loader {name}", f"{ours:.1f} samples/s", f"{base:.1f} samples/s (LocalDataset)",
                             f"{ours / base:.2f}x rate", ">= 10/s" if name == "512K" else ""))
        widths = [max(len(r[c]) for r in rows + [("what", "ours", "baseline", "ratio", "target")])
                  for c in range(5)]
        for r in [("what", "ours", "baseline", "ratio", "target")] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
        print(f"(seconds, best of {args.repeat}: conversion {conv_s:.2f} / {args.workers} workers {conv2_s:.2f}; "
              f"zstd {zconv_s:.2f} / {zconv2_s:.2f}; bare read {read_s:.2f}; loader pinned to one core: "
              f"{not args.all_cores and not args.skip_loader})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
