"""Builders for small data fixtures in temporary folders (nothing is committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROLONG_COLUMNS = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str",
                   "indices": "ndarray:uint32"}


def random_docs(rng: np.random.Generator, n: int, lo: int = 1, hi: int = 300, vocab: int = 128256):
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))).astype(np.uint32) for _ in range(n)]


def write_packed_mds(out: Path, docs_by_domain: dict[str, list[np.ndarray]], *, docs_per_sample: int = 3,
                     size_limit: int = 1 << 13, masks: dict[str, list[np.ndarray]] | None = None,
                     columns: dict | None = None, compression: str | None = None
                     ) -> list[tuple[str, np.ndarray]]:
    """Write ProLong-style packed MDS (``indices`` = start/end pairs of the packed documents) with
    streaming's MDSWriter (``compression`` as streaming names it: zstd, gz, br, snappy, bz2);
    returns the original documents in write order as (domain, tokens)."""
    from streaming import MDSWriter

    cols = dict(columns or PROLONG_COLUMNS)
    if masks is not None:
        cols["mask"] = "ndarray:uint8"
    written = []
    with MDSWriter(out=str(out), columns=cols, size_limit=size_limit, compression=compression) as w:
        # Interleave domains sample by sample, as a mixed folder would be.
        queues = {d: list(range(len(v))) for d, v in docs_by_domain.items()}
        while any(queues.values()):
            for domain, q in queues.items():
                if not q:
                    continue
                take, queues[domain] = q[:docs_per_sample], q[docs_per_sample:]
                docs = [docs_by_domain[domain][k] for k in take]
                lens = np.array([len(d) for d in docs])
                bounds = np.concatenate([[0], np.cumsum(lens)])
                sample = {"input_ids": np.concatenate(docs).astype(np.uint32), "length": int(bounds[-1]),
                          "domain": domain,
                          "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32)}
                if masks is not None:
                    sample["mask"] = np.concatenate([masks[domain][k] for k in take]).astype(np.uint8)
                sample = {k: v for k, v in sample.items() if k in cols}
                w.write(sample)
                written.extend((domain, d) for d in docs)
    return written


def write_indexed(prefix: Path | str, docs, masks=None) -> str:
    """An indexed dataset (and mask dataset) from token arrays, via the project's writer."""
    from megatron_prolong.data.indexed import AtomicIndexedWriter

    w = AtomicIndexedWriter(str(prefix), with_mask=masks is not None)
    for k, d in enumerate(docs):
        w.add(np.asarray(d), None if masks is None else masks[k])
    w.commit()
    return str(prefix)


def counting_docs(lengths, vocab: int = 1000, start: int = 1):
    """Documents whose tokens encode (document number, position) so that tests can tell where
    every token came from: doc k is [base_k, base_k+1, ...] with disjoint ranges."""
    docs, base = [], start
    for n in lengths:
        docs.append(np.arange(base, base + n) % vocab)
        base += n
    return docs


def outputs_like(prefix: Path | str) -> list[str]:
    """Files that would look like (complete or partial) output of ``prefix``."""
    p = Path(prefix)
    return sorted(str(f) for f in p.parent.glob(p.name + "*"))


def write_release_miniature(root: Path, folders: dict[str, str], docs: dict[str, list[np.ndarray]], *,
                            compression: dict[str, str] | None = None, merged: set[str] = frozenset(),
                            parts: int = 2) -> None:
    """A miniature of ProLong's released layout (``prolong-data-512K``): ``root/<folder>/procNN-<parts>/``
    part folders written by MDSWriter, each with its index.json and shards (compressed for the
    folders in ``compression``), and for the folders in ``merged`` a merged ``<folder>/index.json``
    listing the parts' shards, as the release has. ``folders`` maps folder name -> the value of
    the samples' ``domain`` field. Long folders (``-<N>``) hold one document per sample, others
    pack several, as in the release."""
    from streaming.base.util import merge_index

    compression = compression or {}
    for name, domain in folders.items():
        per_sample = 1 if name.rsplit("-", 1)[-1].isdigit() and int(name.rsplit("-", 1)[-1]) >= 8192 else 3
        chunks = np.array_split(np.arange(len(docs[name])), parts)
        for k, idx in enumerate(chunks):
            write_packed_mds(root / name / f"proc{k:02d}-{parts}", {domain: [docs[name][i] for i in idx]},
                             docs_per_sample=per_sample, size_limit=1 << 12,
                             compression=compression.get(name))
        if name in merged:
            merge_index(str(root / name), keep_local=True)
