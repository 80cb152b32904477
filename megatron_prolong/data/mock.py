"""Synthetic packed samples for tests and smoke runs: no files needed, fully deterministic."""

from __future__ import annotations

import numpy as np


class MockDataset:
    """Random documents of random lengths packed into samples of ``seq_length`` tokens.

    Token ids follow a simple learnable rule (each document counts upward modulo the vocab from
    a random start), so a tiny model's loss falls quickly and a broken trainer shows.
    """

    def __init__(self, seq_length: int, vocab_size: int, seed: int = 0, num_samples: int = 1 << 30,
                 mean_doc_length: int | None = None):
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_samples = num_samples
        self.mean_doc_length = mean_doc_length or max(2, seq_length // 3)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        rng = np.random.default_rng([self.seed, idx])
        lengths = []
        total = self.seq_length + 1
        while sum(lengths) < total:
            lengths.append(int(rng.integers(2, 2 * self.mean_doc_length)))
        lengths[-1] -= sum(lengths) - total
        if lengths[-1] == 0:
            lengths.pop()
        docs = [(rng.integers(0, self.vocab_size) + np.arange(n)) % self.vocab_size for n in lengths]
        stream = np.concatenate(docs).astype(np.int64)
        starts = np.cumsum([0] + lengths[:-1])
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        # Position i predicts stream[i+1]; never predict a document's first token from the previous one.
        loss_mask[starts[1:] - 1] = 0.0
        cu = np.array([s for s in starts if s < self.seq_length] + [self.seq_length], dtype=np.int32)
        return {"tokens": stream[:-1], "labels": stream[1:], "loss_mask": loss_mask, "cu_seqlens": cu}
