"""Training-side datasets: packed samples with document boundaries, SFT masks, weighted mixtures.

Every dataset here is random access by *global sample index*: ``dataset[i]`` is the i-th sample of
the run, computed from index arrays built once in ``__init__`` (numpy, vectorised), so exact resume
is ``dataset[consumed_samples + j]`` and costs O(sample). Items follow the contract of
``megatron_prolong.data.batch`` (tokens, labels, loss_mask, cu_seqlens).

Packing (ProLong):

- pre-training: the documents of a dataset, shuffled per epoch, form one token stream; sample ``i``
  is the window ``stream[i*S : i*S + S + 1]`` (tokens = window[:-1], labels = window[1:]). The last
  document of a sample is cut and its overflow starts the next sample; consecutive samples share
  one token (the label of the last position), as in Megatron's GPTDataset, so every token is
  predicted once.
- SFT: whole documents (conversations) are packed greedily into a window of ``S + 1`` tokens; a
  document that does not fit starts the next sample and the rest is padding (masked), so no
  conversation is split across samples; a single document longer than the window is truncated
  (its overflow dropped).

In both, a position whose label is a document's first token has loss_mask 0 (a document is never
predicted from the previous one), padding has loss_mask 0, and where a loss-mask dataset
``PREFIX_mask`` exists it multiplies the loss mask at the label's position (SFT: assistant tokens only).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

from .indexed import DataError, TokenStore, check_prefix_exists, check_vocab, has_mask, mask_prefix

class PackedDataset:
    """Samples of ``seq_length`` tokens packed from one indexed dataset (see module docstring).

    Args:
        prefix: indexed dataset prefix (``.bin``/``.idx``); ``PREFIX_mask`` is used if present.
        seq_length: tokens per sample (S).
        num_samples: how many samples this dataset must serve; the documents repeat (new epoch,
            new shuffle, with a warning) when one pass is not enough.
        seed: shuffling seed; the document order of epoch ``e`` depends on (seed, stream_id, e) only.
        sft: SFT packing (no carry-over, padding) and a required loss-mask dataset.
        vocab_size: if given, samples with token ids >= vocab_size raise DataError.
        stream_id: distinguishes datasets of one blend in the seed.
        shuffle_samples: serve the samples of each epoch in a seeded random order (as Megatron's
            GPTDataset does), so the windows of one long document do not fill one global batch.
    """

    blend_report: dict | None = None  # set by build_train_dataset

    def __init__(self, prefix: str, seq_length: int, num_samples: int, seed: int = 0,
                 sft: bool = False, pad_token_id: int = 0, vocab_size: int | None = None,
                 stream_id: int = 0, shuffle_samples: bool = False):
        if seq_length < 1 or num_samples < 0:
            raise ValueError(f"seq_length must be >= 1 and num_samples >= 0, got {seq_length}, {num_samples}")
        self.prefix = str(prefix)
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.sft = sft
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.store = TokenStore(prefix)
        if sft and not has_mask(prefix):
            check_prefix_exists(mask_prefix(prefix), "SFT loss-mask")
        self.mask_store = TokenStore(mask_prefix(prefix)) if has_mask(prefix) else None
        if self.mask_store is not None and not np.array_equal(self.mask_store.lengths, self.store.lengths):
            raise DataError(f"{mask_prefix(prefix)}: document lengths differ from {prefix}; "
                            "the token and mask datasets are not aligned, rebuild them together")
        lengths = self.store.lengths
        self.n_docs = len(lengths)
        self.epoch_tokens = int(lengths.sum())
        if self.n_docs == 0 or self.epoch_tokens == 0:
            raise DataError(f"{prefix}: the dataset has no tokens")
        rng = np.random.default_rng([seed, stream_id, 0x5EED])
        window = seq_length + 1
        if sft:
            self._build_sft(lengths, window, rng)
        else:
            self._build_pretrain(lengths, window, rng)
        self._warned_epochs: set[int] = set()
        self.sample_order = self._sample_order(rng) if shuffle_samples else None
        if self.epochs > 1:
            msg = (f"dataset {self.prefix} ({self.n_docs} documents, {self.epoch_tokens:,} tokens) "
                   f"is too small for {num_samples} samples of {seq_length} tokens: it is repeated "
                   f"over {self.epochs} epochs, epoch 1 starting at its sample {self.epoch_first_sample[1]}")
            warnings.warn(msg, stacklevel=2)

    # -- index construction (once) -------------------------------------------------------------

    def _permutations(self, rng: np.random.Generator, epochs: int) -> np.ndarray:
        return np.concatenate([rng.permutation(self.n_docs) for _ in range(epochs)]).astype(np.int64)

    def _build_pretrain(self, lengths: np.ndarray, window: int, rng) -> None:
        S = self.seq_length
        needed = self.num_samples * S + 1
        self.epochs = max(1, -(-needed // self.epoch_tokens))
        self.doc_order = self._permutations(rng, self.epochs)
        self.doc_start = np.zeros(len(self.doc_order) + 1, dtype=np.int64)
        np.cumsum(lengths[self.doc_order], out=self.doc_start[1:])
        begin = np.arange(self.num_samples, dtype=np.int64) * S
        # Entries of doc_order overlapping window [begin, begin + S + 1) of each sample.
        self.sample_first = np.searchsorted(self.doc_start, begin, side="right") - 1
        self.sample_end = np.searchsorted(self.doc_start, begin + window, side="left")
        self._epoch_marks(self.sample_end - 1)

    def _build_sft(self, lengths: np.ndarray, window: int, rng) -> None:
        # Greedy sequential packing is inherently serial; one Python pass per epoch over document
        # lengths (no tokens), e.g. ~0.1 s for UltraChat's 200K conversations.
        orders, firsts, ends = [], [], []
        k = 0  # position in the concatenated doc_order
        used = 0
        first = 0
        epochs = 0
        while len(firsts) < self.num_samples:
            order = rng.permutation(self.n_docs)
            orders.append(order)
            epochs += 1
            for n in np.minimum(lengths[order], window).tolist():
                if used and used + n > window:
                    firsts.append(first)
                    ends.append(k)
                    first, used = k, 0
                used += n
                k += 1
            if epochs > 1 and len(firsts) == 0:
                raise DataError(f"{self.prefix}: cannot fill a sample")  # unreachable: n_docs >= 1
        self.epochs = epochs
        self.doc_order = np.concatenate(orders).astype(np.int64)
        self.sample_first = np.asarray(firsts[:self.num_samples], dtype=np.int64)
        self.sample_end = np.asarray(ends[:self.num_samples], dtype=np.int64)
        self._epoch_marks(self.sample_end - 1)

    def _sample_order(self, rng: np.random.Generator) -> np.ndarray:
        """A permutation of the samples within each epoch's range (epochs stay in order, so the
        exhausted-dataset warning still fires when the next epoch starts being served)."""
        bounds = list(self.epoch_first_sample) + [self.num_samples]
        return np.concatenate([lo + rng.permutation(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
                              ).astype(np.int64)

    def _epoch_marks(self, last_entry: np.ndarray) -> None:
        """``epoch_first_sample[e]``: first sample that reaches into epoch e (for warnings)."""
        epoch_of_sample = last_entry // self.n_docs if len(last_entry) else np.zeros(0, np.int64)
        self.epoch_first_sample = np.searchsorted(epoch_of_sample, np.arange(self.epochs), side="left")
        self._epoch_start_set = {int(s): e for e, s in enumerate(self.epoch_first_sample) if e > 0}

    # -- per-sample work -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def _layout(self, i: int):
        """(pieces [(doc, start, end)], document start positions inside the window (>0), valid
        token count of the window). Reads no tokens."""
        k0, k1 = int(self.sample_first[i]), int(self.sample_end[i])
        docs = self.doc_order[k0:k1]
        window = self.seq_length + 1
        if self.sft:
            lens = np.minimum(self.store.lengths[docs], window)
            starts = np.concatenate(([0], np.cumsum(lens)))
            pieces = [(int(d), 0, int(n)) for d, n in zip(docs, lens)]
            return pieces, starts[1:-1], int(starts[-1])
        base = i * self.seq_length
        ds = self.doc_start[k0:k1 + 1] - base  # window-relative starts (and end of last doc)
        a = np.maximum(0, -ds[:-1])
        b = np.minimum(ds[1:], window) - ds[:-1]
        pieces = [(int(d), int(x), int(y)) for d, x, y in zip(docs, a, b)]
        return pieces, ds[1:-1], window

    def doc_lengths(self, i: int) -> np.ndarray:
        """Lengths of the attention segments of sample ``i`` (``np.diff(cu_seqlens)``) without
        reading tokens; padding counts as one segment."""
        _, starts, valid = self._layout(self._check(i))
        return np.diff(self._cu_seqlens(starts, valid))

    def _cu_seqlens(self, starts: np.ndarray, valid: int) -> np.ndarray:
        S = self.seq_length
        # unique: empty documents give repeated starts; padding (from `valid`) is its own segment.
        cuts = np.unique(np.concatenate(([0, min(valid, S), S], starts[starts < S])))
        return cuts.astype(np.int32)

    def _check(self, i: int) -> int:
        """Served index -> packed sample index."""
        i = int(i)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples}) of {self.prefix}")
        return i if self.sample_order is None else int(self.sample_order[i])

    def __getitem__(self, served: int) -> dict:
        i = self._check(served)
        pieces, starts, valid = self._layout(i)
        window = self.seq_length + 1
        stream = np.full(window, self.pad_token_id, dtype=np.int64)
        stream[:valid] = np.concatenate([self.store.doc(d, a, b) for d, a, b in pieces])
        if self.vocab_size is not None:
            check_vocab(stream[:valid], self.vocab_size, f"{self.prefix} sample {i}")
        # label_ok[p]: the token at window position p may be a training target.
        label_ok = np.zeros(window, dtype=np.float32)
        if self.mask_store is not None:
            label_ok[:valid] = np.concatenate([self.mask_store.doc(d, a, b) for d, a, b in pieces])
        else:
            label_ok[:valid] = 1.0
        label_ok[starts] = 0.0  # a document's first token is not predicted from the previous one
        self._maybe_warn_epoch(int(served))
        return {
            "tokens": stream[:-1],
            "labels": stream[1:],
            "loss_mask": label_ok[1:],
            "cu_seqlens": self._cu_seqlens(starts, valid),
        }

    def _maybe_warn_epoch(self, i: int) -> None:
        e = self._epoch_start_set.get(i)
        if e is not None and e not in self._warned_epochs:
            self._warned_epochs.add(e)
            msg = f"dataset {self.prefix} exhausted: starting epoch {e} (repeating its documents) at its sample {i}"
            warnings.warn(msg, stacklevel=3)


class BlendedDataset:
    """Weighted mixture of datasets, interleaved with megatron-core's ``build_blending_indices``
    (the C++ helper behind Megatron's BlendedDataset: each prefix of the sample order follows the
    weights as closely as possible, deterministically)."""

    blend_report: dict | None = None  # set by build_train_dataset

    def __init__(self, datasets: Sequence, dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                 names: Sequence[str] | None = None):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        self.names = list(names) if names is not None else [str(k) for k in range(len(datasets))]

    @staticmethod
    def blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
        from megatron.core.datasets import helpers_cpp  # prebuilt in the wheel; never compile_helpers()

        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        dataset_index = np.zeros(num_samples, dtype=np.int16)
        dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
        helpers_cpp.build_blending_indices(dataset_index, dataset_sample_index, w, len(w),
                                           num_samples, False)
        return dataset_index, dataset_sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def _locate(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        return self.datasets[self.dataset_index[i]], int(self.dataset_sample_index[i])

    def __getitem__(self, i: int) -> dict:
        ds, j = self._locate(i)
        return ds[j]

    def doc_lengths(self, i: int) -> np.ndarray:
        ds, j = self._locate(i)
        return sample_doc_lengths(ds, j)

    def source(self, i: int) -> str:
        """Name (prefix) of the dataset that serves sample ``i``."""
        return self.names[self.dataset_index[int(i)]]


def sample_doc_lengths(dataset, i: int) -> np.ndarray:
    """Document lengths of sample ``i``: cheap where the dataset knows them (``doc_lengths``),
    else read from the sample's ``cu_seqlens``."""
    if hasattr(dataset, "doc_lengths"):
        return dataset.doc_lengths(i)
    return np.diff(np.asarray(dataset[i]["cu_seqlens"]))


def order_global_batch(dataset, indices: Sequence[int]) -> list[int]:
    """ProLong's length-sorted batching: the sample indices of one global batch, most expensive
    first by attention cost (sum of squared document lengths); ties keep their order, so the result
    is deterministic. Give position ``p`` of the result to data-parallel rank ``p % dp`` at
    micro-step ``p // dp``: the ranks then process samples of similar cost at the same time."""
    indices = [int(i) for i in indices]
    cost = [int(np.sum(sample_doc_lengths(dataset, i).astype(np.int64) ** 2)) for i in indices]
    order = sorted(range(len(indices)), key=lambda p: (-cost[p], p))
    return [indices[p] for p in order]


def build_train_dataset(cfg, seq_length: int, seed: int, vocab_size: int, num_samples: int,
                        log: Callable[[str], None] | None = None):
    """The training dataset for ``cfg`` (a ``DataConfig``): ``len()`` == ``num_samples`` and
    ``dataset[i]`` the i-th sample of the run. Missing prefixes fail here, naming the file.

    Prints (through ``log``; default: ``print`` on global rank 0 only) the blend's table -
    requested and effective token share, samples, epochs and longest document per dataset - and
    the long-context warnings of :func:`long_context_warnings`; both are also kept as
    ``dataset.blend_report``."""
    if cfg.mock:
        from .mock import MockDataset

        return MockDataset(seq_length, vocab_size, seed=seed, num_samples=num_samples,
                           mean_doc_length=cfg.mock_mean_doc_length)
    entries = cfg.blend_entries()
    missing = []
    for e in entries:
        try:
            check_prefix_exists(e["prefix"])
            if cfg.sft:
                check_prefix_exists(mask_prefix(e["prefix"]), "SFT loss-mask")
        except FileNotFoundError as err:
            missing.append(str(err))
    if missing:
        raise FileNotFoundError("\n".join(missing))
    if cfg.pad_token_id >= vocab_size:
        raise ValueError(f"DataConfig.pad_token_id={cfg.pad_token_id} is outside the vocabulary ({vocab_size})")
    weights = [e["weight"] for e in entries]
    dataset_index, dataset_sample_index = BlendedDataset.blending_indices(weights, num_samples)
    counts = np.bincount(dataset_index, minlength=len(entries)) if num_samples else np.zeros(len(entries), int)
    datasets = [
        PackedDataset(e["prefix"], seq_length, int(counts[k]), seed=seed, sft=cfg.sft,
                      pad_token_id=cfg.pad_token_id, vocab_size=vocab_size, stream_id=k,
                      shuffle_samples=cfg.shuffle_samples)
        for k, e in enumerate(entries)
    ]
    if len(datasets) == 1:
        dataset = datasets[0]  # dataset_sample_index is the identity
    else:
        dataset = BlendedDataset(datasets, dataset_index, dataset_sample_index, [e["prefix"] for e in entries])
    dataset.blend_report = blend_report(entries, datasets, seq_length, num_samples, check_long=not cfg.sft)
    print_blend_report(dataset.blend_report, seq_length, num_samples, log if log is not None else _print_on_rank0)
    return dataset


def blend_report(entries: list[dict], datasets: Sequence[PackedDataset], seq_length: int,
                 num_samples: int, check_long: bool = True) -> dict:
    """Per dataset of a built blend: requested and effective share, samples, epochs of its data,
    longest document (from the ``.idx``) and the long-data length its name announces; plus the
    long-context warnings (``check_long``; SFT conversations are short by design)."""
    from .mixtures import domain_of, intended_doc_length

    total = sum(e["weight"] for e in entries)
    rows = []
    for e, ds in zip(entries, datasets):
        rows.append({
            "prefix": e["prefix"], "name": domain_of(e["prefix"]),
            "requested": e["weight"] / total,
            "effective": ds.num_samples / num_samples if num_samples else 0.0,
            "samples": ds.num_samples,
            "epochs": ds.num_samples * seq_length / ds.epoch_tokens,
            "longest": int(ds.store.lengths.max()),
            "intended": intended_doc_length(e["prefix"]),
        })
    warnings_ = long_context_warnings(rows, seq_length) if check_long else []
    return {"rows": rows, "warnings": warnings_}


def long_context_warnings(rows: list[dict], seq_length: int) -> list[str]:
    """Where the blend's long data cannot fill the context.

    * A long domain (``intended`` = N, from its ``-<N>`` name) whose longest document is shorter
      than ``min(N, seq_length)``: it does not hold the data its name promises (e.g. 64K pieces
      under ``book-524288``).
    * A blend whose long domains have no document of ``seq_length`` tokens at all (e.g. the 64K
      mixture in a 512K run): attention never spans the context, silently, without this warning.
    """
    out = []
    long_rows = [r for r in rows if r["intended"] is not None]
    for r in long_rows:
        expected = min(r["intended"], seq_length)
        if r["longest"] < expected:
            out.append(f"{r['name']} is long data meant to supply {r['intended']:,}-token documents, but its "
                       f"longest document has {r['longest']:,} tokens (< {expected:,}): check that "
                       f"{r['prefix']} was converted from the {r['intended']}-token folder")
    if long_rows:
        longest = max(r["longest"] for r in long_rows)
        if longest < seq_length:
            out.append(f"no long-data document of this blend fills the {seq_length:,}-token context (longest: "
                       f"{longest:,} tokens): attention never spans more than {longest:,} tokens. Use a "
                       "mixture made for this length (e.g. prolong-512k for 524288) or a shorter seq_length")
    return out


def print_blend_report(report: dict, seq_length: int, num_samples: int, log: Callable[[str], None]) -> None:
    rows = report["rows"]
    width = max(len(r["name"]) for r in rows)
    log(f"[data] {len(rows)} dataset(s), {num_samples:,} samples of {seq_length:,} tokens; token shares:")
    log(f"[data]   {'dataset'.ljust(width)}  requested  effective   samples   epochs  longest doc")
    for r in rows:
        log(f"[data]   {r['name'].ljust(width)}  {r['requested']:>8.2%}  {r['effective']:>9.2%}  "
            f"{r['samples']:>8,}  {r['epochs']:>7.3g}  {r['longest']:>11,}")
    for w in report["warnings"]:
        log(f"[data] WARNING: {w}")


def _print_on_rank0(message: str) -> None:
    """``print`` once per job: on global rank 0 (torch.distributed's rank, else ``RANK``)."""
    import os
    import sys

    dist = sys.modules.get("torch.distributed")
    rank = dist.get_rank() if dist is not None and dist.is_available() and dist.is_initialized() \
        else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(message, flush=True)
