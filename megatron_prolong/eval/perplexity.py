"""Perplexity by position: loss in power-of-two position buckets over long documents.

Position ``p`` is the input position: its loss is that of predicting token ``p + 1`` from the
``p + 1`` tokens before it. Buckets ``[0, 1), [1, 2), [2, 4), ..., [2^k, L)``: a model that uses
its long context keeps lowering the loss in the late buckets; one that does not flattens out.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .engine import Scores


def position_edges(length: int) -> list[int]:
    """``[0, 1, 2, 4, ..., 2^k, length]`` with ``2^k < length``."""
    edges = [0]
    p = 1
    while p < length:
        edges.append(p)
        p *= 2
    edges.append(length)
    return edges


def document_sample(window: np.ndarray) -> dict:
    """A window of ``L + 1`` tokens as one document of ``L`` positions, every label scored."""
    n = len(window) - 1
    return {"tokens": window[:-1], "labels": window[1:], "loss_mask": np.ones(n, dtype=np.float32),
            "cu_seqlens": np.array([0, n], dtype=np.int32)}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def summarize(scores: Scores, edges: Sequence[int]) -> dict:
    """Loss and perplexity overall and per bucket (JSON-ready)."""
    buckets = []
    for i in range(len(edges) - 1):
        tokens = float(scores.bucket_tokens[i])
        loss = float(scores.bucket_loss[i]) / tokens if tokens else float("nan")
        buckets.append({"start": int(edges[i]), "end": int(edges[i + 1]), "tokens": int(tokens),
                        "loss": loss, "ppl": _ppl(loss) if tokens else float("nan")})
    return {"loss": scores.loss, "ppl": _ppl(scores.loss), "tokens": int(scores.tokens), "buckets": buckets}
