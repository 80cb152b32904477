"""The sample / batch contract between datasets and the trainer.

A dataset item is a dict of numpy arrays for one packed sample of ``S`` tokens:

- ``tokens``    int64   [S]    input token ids
- ``labels``    int64   [S]    next-token targets (``labels[i]`` is predicted at position ``i``)
- ``loss_mask`` float32 [S]    1 where ``labels[i]`` is trained on, else 0 (document ends whose
                               label would be the next document's first token, SFT prompts, padding)
- ``cu_seqlens`` int32  [n+1]  document boundaries over the S positions: 0 = cu[0] < ... < cu[n] = S

``collate`` stacks items into torch tensors and turns the boundaries into per-token document
ids (``doc_ids`` [B, S]), the form the attention backends take.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "cu_seqlens")


def doc_ids_from_cu_seqlens(cu_seqlens: np.ndarray, seq_length: int) -> np.ndarray:
    """Per-token document index from boundaries [0, ..., S]."""
    cu = np.asarray(cu_seqlens)
    if cu[0] != 0 or cu[-1] != seq_length or np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to {seq_length}, got {cu.tolist()}")
    return np.repeat(np.arange(len(cu) - 1, dtype=np.int32), np.diff(cu))


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    seq_length = len(samples[0]["tokens"])
    return {
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples]).astype(np.int64)),
        "loss_mask": torch.from_numpy(np.stack([s["loss_mask"] for s in samples]).astype(np.float32)),
        "doc_ids": torch.from_numpy(
            np.stack([doc_ids_from_cu_seqlens(s["cu_seqlens"], seq_length) for s in samples])
        ),
    }
