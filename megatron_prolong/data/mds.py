"""ProLong MDS shards -> Megatron indexed datasets (the engine behind ``tools/mds_to_indexed.py``).

ProLong's schema (mosaicml-streaming MDS): ``input_ids`` (uint32/int32 ndarray, no BOS/EOS),
``length`` (int), ``domain`` (str); packed data adds ``indices`` (start/end pairs of the original
documents inside the packed sample); SFT data adds ``mask`` (per-token loss mask).

Layout. Each ``--input`` folder is either

* an MDS dataset: it has an ``index.json`` (possibly a merged one whose shards live in part
  sub-folders, as in ProLong's release: ``book-65536/index.json`` -> ``proc07-64/shard.00000.mds``);
* or a root of domain folders (a clone of ``princeton-nlp/prolong-data-64K``:
  ``long-context-65536/<domain>/``): every sub-folder holding an MDS dataset - its own
  ``index.json`` or, lacking one, those of its nested part folders - is one domain folder.
  A folder whose sub-folders are all datatools part folders (``proc07-64``) is one domain folder.

Outputs (``split_by``):

* ``folder``: one dataset per domain folder, ``PREFIX.<folder name>``: the key the recipe mixtures
  use (``book-65536`` and ``book-524288`` stay apart even though both hold ``domain="book"``);
* ``field``: one dataset per value of the samples' ``domain`` field (samples without one count as
  their folder's name); folders that share a value are merged, and the tool and summary say so;
* ``none``: a single dataset ``PREFIX``.

Compressed shards (``shard.00000.mds.zstd``; zstd, gz, br, snappy, bz2 as streaming writes them)
are decompressed in memory one shard at a time, with streaming's own codecs: nothing is written
next to the input. Samples are decoded with streaming's column codecs from one buffer per shard.

``workers > 1``: worker processes read, decompress, decode and check whole shards in parallel and
write their tokens straight into the output files at offsets the main process hands out in shard
order, one shard at a time (sequential appends, as with one worker); so the output is
byte-identical to a 1-worker run and no token is written twice.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .indexed import (LLAMA3_VOCAB_SIZE, MASK_DTYPE, TOKEN_DTYPE, AtomicIndexedWriter, DataError,
                      add_buckets, check_vocab, commit_all, histogram_dict, length_buckets)

INDEX_JSON = "index.json"
SPLIT_MODES = ("auto", "domain", "folder", "field", "none")
# Part folders written by one packing process each (datatools: ``proc07-64``; ``0-0``).
_PART_FOLDER = re.compile(r"proc\d+(-\d+)?|\d+-\d+")
_COLUMNS_USED = ("input_ids", "length", "domain", "indices", "mask")
_IOV_MAX = 1024  # buffers per pwritev call (Linux's IOV_MAX)


@dataclass
class DomainFolder:
    """A folder whose MDS data forms one domain: ``name`` is the output key in folder mode."""

    name: str
    path: Path
    mds_dirs: list[Path]


@dataclass
class ShardTask:
    """One MDS shard: the folder its index.json lives in, its entry there, its position in the
    run and the domain folder it belongs to."""

    dirname: str
    info: dict
    order: int
    folder: str
    folder_path: str

    @property
    def path(self) -> str:
        return os.path.join(self.dirname, self.info["raw_data"]["basename"])

    @property
    def zip_path(self) -> str | None:
        zip_data = self.info.get("zip_data")
        return os.path.join(self.dirname, zip_data["basename"]) if zip_data else None


@dataclass
class ConvertOptions:
    vocab_size: int = LLAMA3_VOCAB_SIZE
    min_length: int = 1
    max_length: int | None = None
    split_by: str = "auto"
    """``folder`` / ``field`` / ``none`` (see the module docstring); ``auto``: ``folder`` when an
    input is a root of domain folders or there are several inputs, else ``none``; ``domain`` (what
    ``--split-by-domain`` means): ``folder`` for a root of domain folders, else ``field``."""
    only: list[str] | None = None
    """Convert only these domain folders (by name) and fail if one is missing."""

    def __post_init__(self):
        if not 0 < self.vocab_size <= 2**31:
            raise DataError(f"--vocab-size must be in (0, 2**31] (tokens are stored as int32), got {self.vocab_size}")
        if self.split_by not in SPLIT_MODES:
            raise DataError(f"--split-by must be one of {', '.join(SPLIT_MODES)}, got {self.split_by!r}")


@dataclass
class DomainStats:
    documents: int = 0
    tokens: int = 0
    filtered_short: int = 0
    filtered_long: int = 0
    longest: int = 0
    buckets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    folders: dict = field(default_factory=dict)       # folder path -> documents kept
    field_values: dict = field(default_factory=dict)  # value of the `domain` field -> documents kept

    def merge(self, other: "DomainStats") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.filtered_short += other.filtered_short
        self.filtered_long += other.filtered_long
        self.longest = max(self.longest, other.longest)
        self.buckets = add_buckets(self.buckets, other.buckets)
        for mine, theirs in ((self.folders, other.folders), (self.field_values, other.field_values)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@dataclass
class ShardOutput:
    """What one shard contributes to one output: kept documents as int32 token chunks (and
    uint8 mask chunks) that concatenate to the documents of ``lengths``, and statistics."""

    tokens: list = field(default_factory=list)
    masks: list | None = None
    lengths: list = field(default_factory=list)
    stats: DomainStats = field(default_factory=DomainStats)


def safe_domain(domain: str) -> str:
    """Domain name usable in a file name (``PREFIX.<domain>``)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", domain)


# -- layout -----------------------------------------------------------------------------------

def _subdirs(d: Path) -> list[Path]:
    return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def _mds_dirs(d: Path) -> list[Path]:
    """Folders under ``d`` whose index.json lists shards; a folder with an index.json (a merged one
    included) is not searched further, so no shard is listed twice."""
    if (d / INDEX_JSON).is_file():
        return [d]
    return [x for c in _subdirs(d) for x in _mds_dirs(c)]


def find_domain_folders(inputs: list[str]) -> tuple[list[DomainFolder], bool]:
    """The domain folders of the inputs, in order, and whether an input is a root of domain folders."""
    folders: list[DomainFolder] = []
    any_root = False
    for top in map(Path, inputs):
        if not top.is_dir():
            raise DataError(f"input folder {top} does not exist")
        name = top.resolve().name
        if (top / INDEX_JSON).is_file():
            folders.append(DomainFolder(name, top, [top]))
            continue
        children = [(c, _mds_dirs(c)) for c in _subdirs(top)]
        children = [(c, dirs) for c, dirs in children if dirs]
        if not children:
            raise DataError(f"{top / INDEX_JSON}: missing (not an MDS folder, and no sub-folder has "
                            f"an {INDEX_JSON}); is the download complete?")
        if all(_PART_FOLDER.fullmatch(c.name) for c, _ in children):
            folders.append(DomainFolder(name, top, [d for _, dirs in children for d in dirs]))
        else:
            any_root = True
            folders.extend(DomainFolder(c.name, c, dirs) for c, dirs in children)
    return folders, any_root


def resolve_split(split_by: str, folders: list[DomainFolder], any_root: bool) -> str:
    if split_by == "auto":
        return "folder" if any_root or len(folders) > 1 else "none"
    if split_by == "domain":
        return "folder" if any_root else "field"
    return split_by


def select_folders(folders: list[DomainFolder], split: str, only: list[str] | None) -> list[DomainFolder]:
    """Apply ``only`` and refuse two folders that would write the same output."""
    if only is not None:
        names = {f.name for f in folders}
        missing = [n for n in only if n not in names]
        if missing:
            raise DataError(f"domain folder(s) {missing} not found in the input (found: "
                            f"{sorted(names)}); download them or check the --input root")
        folders = [f for f in folders if f.name in set(only)]
    if split == "folder":
        seen: dict[str, Path] = {}
        for f in folders:
            key = safe_domain(f.name)
            if key in seen:
                raise DataError(f"folders {seen[key]} and {f.path} would both be written to "
                                f"PREFIX.{key}; convert them with separate --output-prefix values")
            seen[key] = f.path
    return folders


def list_shards(folders: list[DomainFolder]) -> list[ShardTask]:
    """All shards of the domain folders, in order, with schema checks on each index.json."""
    tasks: list[ShardTask] = []
    for f in folders:
        for d in f.mds_dirs:
            tasks.extend(_shards_of(d, f, len(tasks)))
    return tasks


def _shards_of(dirname: Path, folder: DomainFolder, start: int) -> list[ShardTask]:
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
        task = ShardTask(str(dirname), info, start + len(tasks), folder.name, str(folder.path))
        _check_shard_file(task, index_path)
        tasks.append(task)
    return tasks


def _check_shard_file(task: ShardTask, index_path: Path) -> None:
    """Fail before converting anything when a shard is absent, truncated or a Git LFS pointer."""
    candidates = [(task.path, task.info["raw_data"]), (task.zip_path, task.info.get("zip_data"))]
    for path, meta in candidates:
        if path is None or not os.path.isfile(path):
            continue
        size, expected = os.path.getsize(path), meta.get("bytes")
        if expected is not None and size != expected:
            with open(path, "rb") as f:
                lfs = f.read(24).startswith(b"version https://git-lfs")
            hint = ("is a Git LFS pointer, not the data: run `git lfs pull` in the clone" if lfs else
                    f"is corrupt: {size} bytes, {index_path} says {expected} (truncated or overwritten; "
                    "copy it again)")
            raise DataError(f"{path}: shard {hint}")
        return
    zipped = f" (nor its compressed copy {os.path.basename(task.zip_path)})" if task.zip_path else ""
    raise DataError(f"{task.path}: shard listed in {index_path} is missing{zipped}")


# -- reading ----------------------------------------------------------------------------------

def shard_bytes(task: ShardTask, buffer: bytearray | None = None) -> tuple[bytes | memoryview, np.ndarray]:
    """The shard's uncompressed bytes - the raw file read whole (into ``buffer`` when given, reused
    from shard to shard: fresh 64 MB allocations cost a page fault per 4 KB), or the compressed file
    decompressed in memory when only that one is there - and its sample offsets, header checked.
    (Read, not memory-mapped: writing tokens out of a mapping faults page by page, 2-4x slower.)"""
    if os.path.isfile(task.path):
        where = task.path
        with open(where, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if buffer is None:
                data = f.read()
            else:
                if len(buffer) < size:
                    buffer.extend(bytes(size - len(buffer)))
                data = memoryview(buffer)[:size]
                if f.readinto(data) != size:
                    raise DataError(f"{where}: shard changed while being read")
    else:
        from streaming.base.compression import decompress

        where, algo = task.zip_path, task.info.get("compression")
        try:
            data = decompress(algo, Path(where).read_bytes())
        except Exception as e:
            raise DataError(f"{where}: corrupt shard, cannot decompress it as {algo!r} ({e!r})") from e
    # MDS shard: uint32 sample count n, n + 1 uint32 offsets, the shard's JSON config, the samples.
    n = int(task.info["samples"])
    ok = len(data) >= 4 and int(np.frombuffer(data, np.uint32, 1)[0]) == n and len(data) >= 4 * (n + 2)
    offsets = np.frombuffer(data, np.uint32, n + 1, 4).astype(np.int64) if ok else None
    if not ok or offsets[0] < 4 * (n + 2) or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
        raise DataError(f"{where}: corrupt shard, its header does not match {n} samples "
                        f"({len(data)} bytes); copy it again")
    return data, offsets


class SampleDecoder:
    """Decodes the columns a conversion needs from a sample's bytes with streaming's codecs;
    arrays are views of the shard buffer (no copy)."""

    def __init__(self, info: dict):
        self.columns = list(zip(info["column_names"], info["column_encodings"], info["column_sizes"]))
        self.n_var = sum(1 for *_, size in self.columns if not size)

    def __call__(self, sample: memoryview) -> dict:
        from streaming.base.format.mds.encodings import mds_decode

        # Layout: the uint32 sizes of the variable-size columns, then every column's bytes.
        var_sizes = np.frombuffer(sample[:4 * self.n_var], np.uint32).tolist()
        pos, k, out = 4 * self.n_var, 0, {}
        for name, encoding, size in self.columns:
            if not size:
                size, k = var_sizes[k], k + 1
            if name in _COLUMNS_USED:
                if pos + size > len(sample):
                    raise ValueError(f"column {name} runs past the end of the sample")
                value = sample[pos:pos + size]
                out[name] = mds_decode(encoding, value if encoding.startswith("ndarray") else bytes(value))
            pos += size
        return out


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


def _chunks(data: np.ndarray, spans: np.ndarray, dtype) -> list[np.ndarray]:
    """``data[a:b]`` for the spans as ``dtype`` arrays: one view when the spans are contiguous."""
    if data.dtype != dtype:
        # uint32 ids were checked < vocab_size <= 2**31: the int32 view has the same values.
        same_bits = data.dtype.itemsize == np.dtype(dtype).itemsize and data.dtype.kind in "iu"
        data = data.view(dtype) if same_bits else data.astype(dtype)
    if np.all(spans[1:, 0] == spans[:-1, 1]):
        return [data[spans[0, 0]:spans[-1, 1]]]
    return [data[a:b] for a, b in spans]


def decode_shard(task: ShardTask, opts: ConvertOptions, split: str, with_mask: bool,
                 buffer: bytearray | None = None) -> dict[str, ShardOutput]:
    """Every sample of one shard, split back into documents, checked and filtered, grouped by
    output key ("" for a single output). The token chunks are views of the shard's bytes (of
    ``buffer``, see :func:`shard_bytes`): write them out before decoding the next shard."""
    try:
        data, offsets = shard_bytes(task, buffer)
        decode = SampleDecoder(task.info)
    except KeyError as e:
        raise DataError(f"{task.path}: shard entry without {e} (corrupt index.json)") from e
    buf = memoryview(data)
    max_length = opts.max_length if opts.max_length is not None else np.iinfo(np.int64).max
    outputs: dict[str, ShardOutput] = {}
    for j in range(len(offsets) - 1):
        where = f"{task.path} sample {j}"
        try:
            sample = decode(buf[offsets[j]:offsets[j + 1]])
        except Exception as e:  # overwritten shard, wrong schema
            raise DataError(f"{where}: corrupt shard, cannot decode ({e!r})") from e
        value = sample.get("domain")
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{where}: empty domain name; fix the 'domain' field")
        key = {"folder": task.folder, "field": value or task.folder, "none": ""}[split]
        ids, mask, spans = split_sample(sample, where)
        check_vocab(ids, opts.vocab_size, where)
        if with_mask and mask is None:
            raise DataError(f"{where}: the sample has no 'mask' but its index.json lists one")
        out = outputs.setdefault(key, ShardOutput(masks=[] if with_mask else None))
        st = out.stats
        lengths = spans[:, 1] - spans[:, 0]
        short, long_ = lengths < opts.min_length, lengths > max_length
        keep = ~(short | long_)
        st.filtered_short += int(short.sum())
        st.filtered_long += int(long_.sum())
        kept = lengths[keep]
        if len(kept):
            out.tokens.extend(_chunks(ids, spans[keep], TOKEN_DTYPE))
            if with_mask:
                out.masks.extend(_chunks(mask, spans[keep], MASK_DTYPE))
            out.lengths.append(kept)
            st.documents += len(kept)
            st.tokens += int(kept.sum())
            st.longest = max(st.longest, int(kept.max()))
            label = value if value is not None else "(no domain field)"
            st.field_values[label] = st.field_values.get(label, 0) + len(kept)
    for out in outputs.values():
        out.lengths = np.concatenate(out.lengths) if out.lengths else np.zeros(0, np.int64)
        out.stats.buckets = length_buckets(out.lengths)
        out.stats.folders = {task.folder_path: out.stats.documents}
    return outputs


# -- parallel writing -------------------------------------------------------------------------

def _pwrite_all(fd: int, chunks: list[np.ndarray], offset: int) -> None:
    """Write the chunks back to back at ``offset`` (``pwritev`` in batches, short writes resumed)."""
    views = [memoryview(c).cast("B") for c in chunks if c.size]
    for i in range(0, len(views), _IOV_MAX):
        batch = views[i:i + _IOV_MAX]
        while batch:
            n = os.pwritev(fd, batch, offset)
            offset += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
            if batch and n:
                batch[0] = batch[0][n:]


def _write_at(outputs: dict[str, ShardOutput], where: dict, fds: dict[str, int]) -> None:
    """Write each output's chunks where the main process placed them (see ``_run_workers``)."""
    for key, (bin_path, mask_path, pos) in where.items():
        out = outputs[key]
        for path, chunks, offset in ((bin_path, out.tokens, pos * np.dtype(TOKEN_DTYPE).itemsize),
                                     (mask_path, out.masks, pos)):
            if path is not None:
                if path not in fds:
                    fds[path] = os.open(path, os.O_WRONLY)
                _pwrite_all(fds[path], chunks, offset)


def _worker_main(worker: int, tasks, results, offsets_conn, opts: ConvertOptions, split: str,
                 with_mask: bool) -> None:
    """Worker process: decode shards taken in order, report their document lengths, wait for the
    offsets of their data in the output files, write it there."""
    fds: dict[str, int] = {}
    buffer = bytearray()
    try:
        while (task := tasks.get()) is not None:
            try:
                outputs = decode_shard(task, opts, split, with_mask, buffer)
            except BaseException as e:  # noqa: BLE001 - reported to the main process
                results.put(("error", task.order, type(e).__name__, str(e), traceback.format_exc()))
                return
            results.put(("sizes", task.order, worker,
                         {k: (o.lengths, o.stats) for k, o in outputs.items()}))
            _write_at(outputs, offsets_conn.recv(), fds)
            del outputs  # its chunks view `buffer`, which the next shard may need to grow
            results.put(("done", task.order))
    finally:
        for fd in fds.values():
            os.close(fd)


def _run_workers(tasks: list[ShardTask], workers: int, opts: ConvertOptions, split: str, with_mask: bool,
                 place: Callable[[int, dict], dict]) -> None:
    """Convert the shards in ``workers`` processes; ``place(order, {key: (lengths, stats)})`` is
    called in shard order and returns ``{key: (bin path, mask path, first token position)}``."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imported once, inherited by fork)
    import streaming.base.compression  # noqa: F401
    import streaming.base.format.mds.encodings  # noqa: F401

    ctx = mp.get_context("fork")  # workers inherit the imported modules (spawn re-imports torch)
    task_q, results = ctx.Queue(), ctx.Queue()
    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
    procs = [ctx.Process(target=_worker_main, daemon=True,
                         args=(w, task_q, results, pipes[w][0], opts, split, with_mask))
             for w in range(workers)]
    for p in procs:
        p.start()
    try:
        for t in tasks:
            task_q.put(t)
        for _ in procs:
            task_q.put(None)
        reported: dict[int, tuple[int, dict]] = {}  # order -> (worker, document lengths)
        placed: dict[int, tuple[int, dict]] = {}    # order -> (worker, where to write)
        next_order, next_write, done = 0, 0, 0
        while done < len(tasks):
            try:
                msg = results.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(f"a conversion worker died (exit code {dead[0]}; out of memory?); "
                                    "retry with fewer --workers") from None
                continue
            if msg[0] == "error":
                _, order, kind, text, tb = msg
                if kind == "DataError":
                    raise DataError(text)
                raise RuntimeError(f"converting {tasks[order].path} failed: {kind}: {text}\n{tb}")
            if msg[0] == "done":
                done += 1
            else:
                _, order, worker, outputs = msg
                reported[order] = (worker, outputs)
                while next_order in reported:
                    worker, outputs = reported.pop(next_order)
                    placed[next_order] = (worker, place(next_order, outputs))
                    next_order += 1
            # One shard written at a time, in order (sequential appends, as with one worker);
            # the other workers keep reading and decoding meanwhile.
            if next_write == done and next_write in placed:
                worker, where = placed.pop(next_write)
                pipes[worker][1].send(where)
                next_write += 1
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        for a, b in pipes:
            a.close()
            b.close()


# -- conversion -------------------------------------------------------------------------------

def convert_mds(input_dirs: list[str], output_prefix: str, opts: ConvertOptions,
                workers: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """Convert MDS folders to indexed dataset(s); returns the summary (also written as
    ``PREFIX.summary.json``). Nothing complete-looking is left behind on error."""
    folders, any_root = find_domain_folders(input_dirs)
    split = resolve_split(opts.split_by, folders, any_root)
    folders = select_folders(folders, split, opts.only)
    tasks = list_shards(folders)
    masks = {"mask" in t.info["column_names"] for t in tasks}
    if len(masks) > 1:
        raise DataError("some inputs have an SFT 'mask' column and some do not; convert them "
                        "separately so that tokens and masks stay aligned")
    with_mask = masks == {True}
    writers: dict[str, AtomicIndexedWriter] = {}
    names: dict[str, str] = {}  # file-name form -> key, to refuse two keys on one file
    totals: dict[str, DomainStats] = {}
    t0 = time.time()

    def writer_for(key: str) -> AtomicIndexedWriter:
        if key not in writers:
            safe = safe_domain(key)
            if names.setdefault(safe, key) != key:
                raise DataError(f"domains {names[safe]!r} and {key!r} would both be written to "
                                f"{output_prefix}.{safe}; rename one of them")
            writers[key] = AtomicIndexedWriter(f"{output_prefix}.{safe}" if key else output_prefix,
                                               with_mask=with_mask)
        return writers[key]

    def account(order: int, stats: dict[str, DomainStats]) -> None:
        for key, s in stats.items():
            totals.setdefault(key, DomainStats()).merge(s)
        if progress is not None:
            tok = sum(s.tokens for s in totals.values())
            dt = max(time.time() - t0, 1e-9)
            progress(f"[mds_to_indexed] shard {order + 1}/{len(tasks)}  {tok:,} tokens  "
                     f"{tok / dt / 1e6:.1f} M tok/s")

    def write_in_order(order: int, outputs: dict[str, ShardOutput]) -> None:
        for key, out in outputs.items():
            if len(out.lengths):
                writer_for(key).write_part(out.tokens, out.lengths, out.masks)
        account(order, {k: o.stats for k, o in outputs.items()})

    def place(order: int, outputs: dict) -> dict:
        where = {}
        for key, (lengths, _) in outputs.items():
            if len(lengths):
                w = writer_for(key)
                where[key] = (*w.data_paths, w.reserve(lengths))
        account(order, {k: s for k, (_, s) in outputs.items()})
        return where

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        workers = max(1, min(workers, len(tasks)))
        if workers == 1:
            buffer = bytearray()
            for task in tasks:
                # No reference to the outputs may outlive this call: their chunks view `buffer`.
                write_in_order(task.order, decode_shard(task, opts, split, with_mask, buffer))
        else:
            _run_workers(tasks, workers, opts, split, with_mask, place)
        summary = _summary(input_dirs, output_prefix, opts, split, totals, writers, with_mask)
        commit_all(writers.values(), f"{output_prefix}.summary.json", summary)
        return summary
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def _summary(input_dirs, output_prefix, opts, split, totals, writers, with_mask) -> dict:
    if not totals or sum(s.documents for s in totals.values()) == 0:
        raise DataError(f"no documents found in {input_dirs} (after length filters "
                        f"min={opts.min_length}, max={opts.max_length})")
    empty = [d for d, s in totals.items() if s.documents == 0]
    if empty and split != "none":
        raise DataError(f"domain(s) {empty} have no documents after the length filters "
                        f"(min={opts.min_length}, max={opts.max_length}); relax the filters or "
                        "drop those inputs")
    domains = {}
    for d, s in sorted(totals.items()):
        domains[d] = {
            "prefix": writers[d].prefix if d in writers else None,
            "folders": dict(sorted(s.folders.items())),
            "domain_field": dict(sorted(s.field_values.items())),
            "documents": s.documents, "tokens": s.tokens, "longest_document": s.longest,
            "filtered_short": s.filtered_short, "filtered_long": s.filtered_long,
            "length_histogram": histogram_dict(s.buckets),
        }
    return {
        "inputs": [str(p) for p in input_dirs],
        "output_prefix": str(output_prefix),
        "outputs": sorted(w.prefix for w in writers.values()),
        "split_by": split,
        "has_mask": with_mask,
        "documents": sum(s.documents for s in totals.values()),
        "tokens": sum(s.tokens for s in totals.values()),
        "min_length": opts.min_length, "max_length": opts.max_length,
        "vocab_size": opts.vocab_size,
        "domains": domains,
    }
