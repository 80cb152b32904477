"""Megatron indexed datasets (``.bin``/``.idx``): atomic writing, fail-fast opening, mask pairing.

Writing goes through megatron-core's ``IndexedDatasetBuilder`` so that the files are exactly what
``megatron.core.datasets.indexed_dataset.IndexedDataset`` reads. Every output is first written
under a temporary name and renamed only when the whole job succeeded, so a crash or a bad input
never leaves a complete-looking ``.bin``/``.idx`` pair behind.

megatron-core is imported lazily: importing it costs seconds, and modules such as the chat template
or the config do not need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

#: Llama-3 vocabulary size; ids must fit int32 (the dtype Megatron picks for vocabularies > 65500).
LLAMA3_VOCAB_SIZE = 128256
TOKEN_DTYPE = np.int32
MASK_DTYPE = np.uint8
#: The loss-mask dataset of ``PREFIX`` lives at ``PREFIX + MASK_SUFFIX`` (same document layout).
MASK_SUFFIX = "_mask"


class DataError(Exception):
    """Bad input (missing/corrupt file, bad schema, out-of-vocabulary tokens); the message names
    the offending file and says how to fix it. Tools print it and exit non-zero."""


def mask_prefix(prefix: str | os.PathLike) -> str:
    """Prefix of the loss-mask dataset that belongs to the token dataset ``prefix``."""
    return f"{prefix}{MASK_SUFFIX}"


def has_mask(prefix: str | os.PathLike) -> bool:
    return all(Path(mask_prefix(prefix) + ext).exists() for ext in (".bin", ".idx"))


def check_prefix_exists(prefix: str | os.PathLike, what: str = "dataset") -> None:
    """Fail fast with the missing file's name (megatron-core only asserts)."""
    for ext in (".idx", ".bin"):
        path = Path(f"{prefix}{ext}")
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} prefix {prefix!s}: missing file {path}. Build it with "
                "tools/mds_to_indexed.py or tools/tokenize_to_indexed.py, or fix the prefix "
                "(give the path without .bin/.idx).")


def open_indexed(prefix: str | os.PathLike):
    """Open ``prefix`` as a megatron-core ``IndexedDataset``, with a clear error if it is absent
    or unreadable."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_prefix_exists(prefix)
    try:
        return IndexedDataset(str(prefix))
    except Exception as e:  # corrupt header, truncated index, ...
        raise DataError(f"cannot read indexed dataset {prefix}.idx/.bin: {e}") from e


def document_lengths(ds) -> np.ndarray:
    """Per-document token counts of an IndexedDataset written with one sequence per document."""
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    if len(ds.document_indices) != len(lengths) + 1:
        raise DataError(
            f"{ds.path_prefix}: documents made of several sequences are not supported "
            "(write one sequence per document, as the tools in tools/ do)")
    return lengths


class TokenStore:
    """Flat, memory-mapped view of an indexed dataset's tokens: ``doc(d, a, b)`` is a zero-copy
    slice of document ``d``. Cheaper than ``IndexedDataset.get`` per call, which matters when a
    512K-token sample spans hundreds of short documents."""

    def __init__(self, prefix: str | os.PathLike):
        ds = open_indexed(prefix)
        self.prefix = str(prefix)
        self.lengths = document_lengths(ds)
        self.dtype = np.dtype(ds.index.dtype)
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        bin_path = f"{prefix}.bin"
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        if os.path.getsize(bin_path) != expected:
            raise DataError(f"{bin_path}: size {os.path.getsize(bin_path)} bytes does not match its "
                            f".idx ({expected} bytes); the pair is truncated or mismatched, rebuild it")
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if expected
                       else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, d: int, start: int = 0, end: int | None = None) -> np.ndarray:
        base = self.offsets[d]
        end = self.lengths[d] if end is None else end
        return self.tokens[base + start: base + end]


class AtomicIndexedWriter:
    """One indexed dataset (and optionally its aligned loss-mask dataset) written under temporary
    names; ``commit()`` renames them into place, ``abort()`` deletes them.

    Documents are added with ``add(tokens, mask=None)``; one sequence per document.
    """

    def __init__(self, prefix: str | os.PathLike, with_mask: bool = False,
                 vocab_size: int | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.with_mask = with_mask
        self.vocab_size = vocab_size
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = f"{self.prefix}.tmp{os.getpid()}"
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=TOKEN_DTYPE)
        self._mask_builder = (IndexedDatasetBuilder(mask_prefix(self._tmp) + ".bin", dtype=MASK_DTYPE)
                              if with_mask else None)
        self.documents = 0
        self.tokens = 0
        self._finalized = False

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append one document (and its loss mask when the writer has one)."""
        self.add_documents(tokens, np.array([[0, len(tokens)]], dtype=np.int64), mask)

    def add_documents(self, tokens: np.ndarray, spans: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append the documents ``tokens[a:b]`` for each ``[a, b)`` row of ``spans`` (ordered).

        One write per call, not per document: packed 64K samples hold hundreds of short documents,
        and per-document ``IndexedDatasetBuilder.add_document`` calls would dominate conversion.
        The builder's public ``data_file`` / ``sequence_lengths`` / ``document_indices`` are
        filled exactly as ``add_document`` would fill them (one sequence per document).
        """
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        if len(spans) == 0:
            return
        if self._mask_builder is not None and (mask is None or len(mask) != len(tokens)):
            raise DataError(f"{self.prefix}: every document needs a loss mask of its length "
                            f"(document {self.documents}: {len(tokens)} tokens, mask "
                            f"{None if mask is None else len(mask)})")
        lengths = spans[:, 1] - spans[:, 0]
        self._append(self._builder, tokens, spans, TOKEN_DTYPE)
        if self._mask_builder is not None:
            self._append(self._mask_builder, mask, spans, MASK_DTYPE)
        self._register(lengths)

    @staticmethod
    def _append(builder, data: np.ndarray, spans: np.ndarray, dtype) -> None:
        data = np.asarray(data)
        if np.all(spans[1:, 0] == spans[:-1, 1]):
            chunk = data[spans[0, 0]:spans[-1, 1]]
        else:
            chunk = np.concatenate([data[a:b] for a, b in spans])
        if chunk.dtype == np.uint32 and dtype == np.int32:
            chunk = chunk.view(np.int32)  # ids were checked < vocab_size <= 2**31: same bits
        chunk = np.ascontiguousarray(chunk, dtype=dtype)
        builder.data_file.write(memoryview(chunk).cast("B"))

    def write_part(self, tokens: list[np.ndarray], lengths: np.ndarray,
                   masks: list[np.ndarray] | None = None) -> None:
        """Append documents given as token chunks (concatenated, they are the documents of
        ``lengths`` in order); ``masks`` are the aligned loss-mask chunks. No copy is made: each
        chunk is written as it is (int32 / uint8)."""
        self._check_part(masks)
        for chunk in tokens:
            self._builder.data_file.write(memoryview(chunk).cast("B"))
        if self._mask_builder is not None:
            for chunk in masks:
                self._mask_builder.data_file.write(memoryview(chunk).cast("B"))
        self._register(lengths)

    def reserve(self, lengths: np.ndarray) -> int:
        """Register documents whose data another process writes into :attr:`data_paths` itself;
        returns their first token's position (tokens at ``4 * pos`` bytes, mask at ``pos``).
        ``finalize`` checks that the files were filled exactly."""
        first = self.tokens
        self._register(lengths)
        return first

    @property
    def data_paths(self) -> tuple[str, str | None]:
        """Temporary ``.bin`` paths (tokens, loss mask or None) that :meth:`reserve` hands out."""
        return self._tmp + ".bin", (mask_prefix(self._tmp) + ".bin" if self.with_mask else None)

    def _check_part(self, masks) -> None:
        if (self._mask_builder is not None) != (masks is not None):
            raise DataError(f"{self.prefix}: loss masks must be given for every document of a "
                            "dataset with a mask, and only then")

    def _register(self, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=np.int64).tolist()
        for builder in (self._builder, self._mask_builder):
            if builder is not None:
                first = len(builder.sequence_lengths)
                builder.sequence_lengths.extend(lengths)
                builder.document_indices.extend(range(first + 1, first + 1 + len(lengths)))
        self.documents += len(lengths)
        self.tokens += int(sum(lengths))

    def _pairs(self) -> list[tuple[str, str]]:
        prefixes = [(self._tmp, self.prefix)]
        if self.with_mask:
            prefixes.append((mask_prefix(self._tmp), mask_prefix(self.prefix)))
        return [(a + ext, b + ext) for a, b in prefixes for ext in (".bin", ".idx")]

    def finalize(self) -> None:
        """Write the .idx files (still under temporary names), after checking that each .bin
        holds exactly the registered tokens (data written by other processes included)."""
        if not self._finalized:
            pairs = [(self._builder, self._tmp, np.dtype(TOKEN_DTYPE).itemsize)]
            if self._mask_builder is not None:
                pairs.append((self._mask_builder, mask_prefix(self._tmp), np.dtype(MASK_DTYPE).itemsize))
            for builder, tmp, itemsize in pairs:
                builder.data_file.close()
                size, expected = os.path.getsize(tmp + ".bin"), self.tokens * itemsize
                if size != expected:  # a bug, never bad input: refuse to write a wrong pair
                    raise DataError(f"{tmp}.bin: {size} bytes written, {expected} expected")
                builder.finalize(tmp + ".idx")
            self._finalized = True

    def commit(self) -> None:
        self.finalize()
        for tmp, final in self._pairs():
            os.replace(tmp, final)

    def abort(self) -> None:
        for f in (self._builder, self._mask_builder):
            if f is not None and not f.data_file.closed:
                f.data_file.close()
        for tmp, _ in self._pairs():
            if os.path.exists(tmp):
                os.remove(tmp)


def commit_all(writers: Iterable[AtomicIndexedWriter], summary_path: str | None = None,
               summary: dict | None = None) -> None:
    """Finalize every writer, then rename; the JSON summary is renamed last, so its presence marks
    a complete conversion."""
    import json

    writers = list(writers)
    for w in writers:
        w.finalize()
    for w in writers:
        w.commit()
    if summary_path is not None:
        tmp = f"{summary_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, summary_path)


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Document counts per power-of-two length bucket (entry ``b``: lengths in [2**b, 2**(b+1)));
    arrays of different sizes add up after padding, see :func:`add_buckets`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64))


def add_buckets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), dtype=np.int64)
    out[:len(a)] += a
    out[:len(b)] += b
    return out


def histogram_dict(counts: np.ndarray) -> dict[str, int]:
    """``length_buckets`` counts as ``{"1024-2047": n, ...}`` (empty buckets left out)."""
    return {f"{1 << b}-{(1 << (b + 1)) - 1}": int(c) for b, c in enumerate(counts) if c}


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Document counts per power-of-two length bucket, keys like ``"1024-2047"``."""
    return histogram_dict(length_buckets(lengths))


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise DataError if a token id is negative or >= vocab_size."""
    if len(tokens) == 0:
        return
    hi = int(tokens.max())
    lo = 0 if tokens.dtype.kind == "u" else int(tokens.min())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size}); "
                        "pass the right --vocab-size or check the tokenizer")
