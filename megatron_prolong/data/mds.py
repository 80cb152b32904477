"""ProLong MDS shards -> Megatron indexed datasets (the engine behind ``tools/mds_to_indexed.py``).

ProLong's schema (mosaicml-streaming MDS): ``input_ids`` (uint32/int32 ndarray, no BOS/EOS),
``length`` (int), ``domain`` (str); packed data adds ``indices`` (start/end pairs of the original
documents inside the packed sample); SFT data adds ``mask`` (per-token loss mask).

Shards are read with streaming's own readers (``streaming.base.format.reader_from_json``), one
shard at a time, so ``--workers`` can convert shards in parallel; the output does not depend on the
number of workers (parts are merged in shard order).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .indexed import (LLAMA3_VOCAB_SIZE, AtomicIndexedWriter, DataError, check_vocab,
                      commit_all, length_histogram, mask_prefix)

INDEX_JSON = "index.json"


@dataclass
class ShardTask:
    """One MDS shard: the folder it lives in, its entry of index.json, its position in the run."""

    dirname: str
    info: dict
    order: int
    default_domain: str

    @property
    def path(self) -> str:
        return os.path.join(self.dirname, self.info["raw_data"]["basename"])


@dataclass
class ConvertOptions:
    vocab_size: int = LLAMA3_VOCAB_SIZE
    min_length: int = 1
    max_length: int | None = None
    split_by_domain: bool = False

    def __post_init__(self):
        if not 0 < self.vocab_size <= 2**31:
            raise DataError(f"--vocab-size must be in (0, 2**31] (tokens are stored as int32), got {self.vocab_size}")


@dataclass
class DomainStats:
    documents: int = 0
    tokens: int = 0
    filtered_short: int = 0
    filtered_long: int = 0
    lengths: list = field(default_factory=list)

    def merge(self, other: "DomainStats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.filtered_short += other.filtered_short
        self.filtered_long += other.filtered_long
        self.lengths.extend(other.lengths)


def safe_domain(domain: str) -> str:
    """Domain name usable in a file name (``PREFIX.<domain>``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", domain)


def list_shards(input_dirs: list[str]) -> list[ShardTask]:
    """All shards of the given MDS folders, in order, with schema checks on each index.json.

    A folder without index.json but with sub-folders that have one (ProLong's layout:
    ``prolong-data-64K/<domain>/index.json``) is expanded to those sub-folders, sorted.
    """
    tasks: list[ShardTask] = []
    for top in input_dirs:
        top_path = Path(top)
        if not top_path.is_dir():
            raise DataError(f"input folder {top} does not exist")
        if (top_path / INDEX_JSON).exists():
            dirs = [top_path]
        else:
            dirs = sorted(p.parent for p in top_path.glob(f"*/{INDEX_JSON}"))
            if not dirs:
                raise DataError(f"{top_path / INDEX_JSON}: missing (not an MDS folder, and no "
                                f"sub-folder has an {INDEX_JSON})")
        for d in dirs:
            tasks.extend(_shards_of(d, len(tasks)))
    return tasks


def _shards_of(dirname: Path, start: int) -> list[ShardTask]:
    index_path = dirname / INDEX_JSON
    try:
        obj = json.loads(index_path.read_text())
        shards = obj["shards"]
        if not isinstance(shards, list):
            raise TypeError("'shards' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index_path}: corrupt or unreadable MDS index ({e!r}); re-copy the "
                        "dataset or rewrite it with streaming's MDSWriter") from e
    tasks = []
    for info in shards:
        try:
            fmt, columns = info["format"], info["column_names"]
            info["raw_data"]["basename"]
        except (KeyError, TypeError) as e:
            raise DataError(f"{index_path}: shard entry without {e} (corrupt index.json)") from e
        if fmt != "mds":
            raise DataError(f"{index_path}: shard format {fmt!r} is not supported, only 'mds'")
        if "input_ids" not in columns:
            raise DataError(f"{index_path}: the schema has no 'input_ids' column (columns: "
                            f"{columns}); this is not ProLong-style token data")
        task = ShardTask(str(dirname), info, start + len(tasks), dirname.name)
        if not os.path.isfile(task.path):
            hint = " (only a compressed copy exists: decompress it first)" if info.get("zip_data") \
                and os.path.isfile(os.path.join(dirname, info["zip_data"]["basename"])) else ""
            raise DataError(f"{task.path}: shard listed in {index_path} is missing{hint}")
        tasks.append(task)
    return tasks


def split_sample(sample: dict, where: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(input_ids, mask or None, [n, 2] start/end pairs of the original documents) of one
    (possibly packed) sample, validated."""
    ids = np.asarray(sample["input_ids"])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{where}: input_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    length = sample.get("length")
    if length is not None and int(length) != len(ids):
        raise DataError(f"{where}: 'length' is {length} but input_ids has {len(ids)} tokens")
    mask = sample.get("mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise DataError(f"{where}: mask has shape {mask.shape}, input_ids {ids.shape}")
    indices = sample.get("indices")
    if indices is None:
        return ids, mask, np.array([[0, len(ids)]], dtype=np.int64)
    pairs = np.asarray(indices, dtype=np.int64).reshape(-1, 2)
    starts, ends = pairs[:, 0], pairs[:, 1]
    if len(pairs) and (starts[0] < 0 or ends[-1] > len(ids) or np.any(ends <= starts)
                       or np.any(starts[1:] < ends[:-1])):
        raise DataError(f"{where}: 'indices' must be ordered, non-overlapping [start, end) pairs "
                        f"inside the {len(ids)} tokens, got {pairs.tolist()[:8]}...")
    return ids, mask, pairs


def read_shard(task: ShardTask, opts: ConvertOptions
               ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]]:
    """(domain, input_ids, mask, document spans) for every sample of one shard, vocabulary checked."""
    from streaming.base.format import reader_from_json

    try:
        reader = reader_from_json(task.dirname, None, task.info)
    except Exception as e:
        raise DataError(f"{task.path}: cannot open shard ({e!r})") from e
    for j in range(reader.samples):
        where = f"{task.path} sample {j}"
        try:
            sample = reader[j]
        except Exception as e:  # truncated or overwritten shard
            raise DataError(f"{where}: corrupt shard, cannot decode ({e!r})") from e
        domain = sample.get("domain", None)
        if domain is None:
            domain = task.default_domain
        if not isinstance(domain, str) or not domain.strip():
            raise DataError(f"{where}: empty domain name; fix the 'domain' field")
        ids, mask, spans = split_sample(sample, where)
        check_vocab(ids, opts.vocab_size, where)
        yield domain, ids, mask, spans


WriterFor = Callable[[str], AtomicIndexedWriter]


def convert_shard(task: ShardTask, opts: ConvertOptions, writer_for: WriterFor
                  ) -> dict[str, DomainStats]:
    """Write one shard's documents through ``writer_for(domain)``; returns per-domain stats."""
    stats: dict[str, DomainStats] = {}
    max_length = opts.max_length if opts.max_length is not None else np.iinfo(np.int64).max
    for domain, ids, mask, spans in read_shard(task, opts):
        st = stats.setdefault(domain, DomainStats())
        lengths = spans[:, 1] - spans[:, 0]
        short, long_ = lengths < opts.min_length, lengths > max_length
        keep = ~(short | long_)
        st.filtered_short += int(short.sum())
        st.filtered_long += int(long_.sum())
        if keep.any():
            writer_for(domain).add_documents(ids, spans[keep], mask)
            st.documents += int(keep.sum())
            st.tokens += int(lengths[keep].sum())
            st.lengths.extend(lengths[keep].tolist())
    return stats


def _shard_has_mask(task: ShardTask) -> bool:
    return "mask" in task.info["column_names"]


# Per-process state of pool workers (set by the fork-inherited globals below).
_WORKER_CTX: dict = {}


def _convert_shard_to_parts(task: ShardTask) -> tuple[int, dict[str, str], dict[str, DomainStats]]:
    """Pool worker: convert one shard into part datasets under the temp folder."""
    opts, tmpdir, with_mask = _WORKER_CTX["opts"], _WORKER_CTX["tmpdir"], _WORKER_CTX["with_mask"]
    parts: dict[str, AtomicIndexedWriter] = {}

    def writer_for(domain: str) -> AtomicIndexedWriter:
        key = domain if opts.split_by_domain else ""
        if key not in parts:
            parts[key] = AtomicIndexedWriter(os.path.join(tmpdir, f"s{task.order}.{safe_domain(key)}"),
                                             with_mask=with_mask)
        return parts[key]

    try:
        stats = convert_shard(task, opts, writer_for)
        for w in parts.values():
            w.commit()
    except BaseException:
        for w in parts.values():
            w.abort()
        raise
    return task.order, {k: w.prefix for k, w in parts.items()}, stats


def convert_mds(input_dirs: list[str], output_prefix: str, opts: ConvertOptions,
                workers: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """Convert MDS folders to indexed dataset(s); returns the summary (also written as
    ``PREFIX.summary.json``). Nothing complete-looking is left behind on error."""
    tasks = list_shards(input_dirs)
    masks = {_shard_has_mask(t) for t in tasks}
    if len(masks) > 1:
        raise DataError("some inputs have an SFT 'mask' column and some do not; convert them "
                        "separately so that tokens and masks stay aligned")
    with_mask = masks == {True}
    writers: dict[str, AtomicIndexedWriter] = {}
    totals: dict[str, DomainStats] = {}
    t0 = time.time()

    def writer_for(domain: str) -> AtomicIndexedWriter:
        key = domain if opts.split_by_domain else ""
        if key not in writers:
            prefix = f"{output_prefix}.{safe_domain(key)}" if key else output_prefix
            writers[key] = AtomicIndexedWriter(prefix, with_mask=with_mask)
        return writers[key]

    def account(order: int, stats: dict[str, DomainStats]) -> None:
        for d, s in stats.items():
            totals.setdefault(d, DomainStats()).merge(s)
        if progress is not None:
            tok = sum(s.tokens for s in totals.values())
            dt = max(time.time() - t0, 1e-9)
            progress(f"[mds_to_indexed] shard {order + 1}/{len(tasks)}  {tok:,} tokens  "
                     f"{tok / dt / 1e6:.1f} M tok/s")

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=".mds_to_indexed.", dir=Path(output_prefix).parent) \
        if workers > 1 else None
    try:
        if workers <= 1:
            for task in tasks:
                account(task.order, convert_shard(task, opts, writer_for))
        else:
            _WORKER_CTX.update(opts=opts, tmpdir=tmpdir, with_mask=with_mask)
            # Import the heavy modules once here so that forked workers inherit them.
            import megatron.core.datasets.indexed_dataset  # noqa: F401
            import streaming.base.format  # noqa: F401

            # fork: workers inherit the imported modules (spawn would re-import torch/streaming).
            with mp.get_context("fork").Pool(workers) as pool:
                for order, parts, stats in pool.imap(_convert_shard_to_parts, tasks):
                    for key, part in parts.items():
                        writer_for(key or "").add_index(part)
                        for pre in (part, mask_prefix(part)):
                            for ext in (".bin", ".idx"):
                                Path(pre + ext).unlink(missing_ok=True)
                    account(order, stats)
        summary = _summary(input_dirs, output_prefix, opts, totals, writers, with_mask)
        commit_all(writers.values(), f"{output_prefix}.summary.json", summary)
        return summary
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _summary(input_dirs, output_prefix, opts, totals, writers, with_mask) -> dict:
    if not totals or sum(s.documents for s in totals.values()) == 0:
        raise DataError(f"no documents found in {input_dirs} (after length filters "
                        f"min={opts.min_length}, max={opts.max_length})")
    empty = [d for d, s in totals.items() if s.documents == 0]
    if empty and opts.split_by_domain:
        raise DataError(f"domain(s) {empty} have no documents after the length filters "
                        f"(min={opts.min_length}, max={opts.max_length}); relax the filters or "
                        "drop those inputs")
    domains = {}
    for d, s in sorted(totals.items()):
        domains[d] = {
            "documents": s.documents, "tokens": s.tokens,
            "filtered_short": s.filtered_short, "filtered_long": s.filtered_long,
            "length_histogram": length_histogram(np.array(s.lengths, dtype=np.int64)),
            "prefix": (f"{output_prefix}.{safe_domain(d)}" if opts.split_by_domain else output_prefix),
        }
    return {
        "inputs": [str(p) for p in input_dirs],
        "output_prefix": str(output_prefix),
        "outputs": sorted(w.prefix for w in writers.values()),
        "split_by_domain": opts.split_by_domain,
        "has_mask": with_mask,
        "documents": sum(s.documents for s in totals.values()),
        "tokens": sum(s.tokens for s in totals.values()),
        "min_length": opts.min_length, "max_length": opts.max_length,
        "vocab_size": opts.vocab_size,
        "domains": domains,
    }
