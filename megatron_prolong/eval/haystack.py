"""Token sources for haystacks and long documents: an indexed dataset, built-in text, random ids.

``TokenStream(tokens)`` serves contiguous slices of a token array from seeded random offsets
(wrapping around): the haystack of a needle case, or a window for perplexity. An indexed dataset's
``.bin`` is such an array (its documents concatenated), memory-mapped, so a corpus of any size
costs nothing to open.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.indexed import DataError, TokenStore, check_vocab


class TokenStream:
    """Slices of one token array; ``take(n, rng)`` starts at a random offset and wraps around."""

    def __init__(self, tokens: np.ndarray, source: str):
        if len(tokens) == 0:
            raise DataError(f"{source}: no tokens to build haystacks from")
        self.tokens, self.source = tokens, source

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, len(self.tokens)))
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:  # wrap around a corpus shorter than the request
            piece = self.tokens[start:start + n - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            start = 0
        return out

    def check_vocab(self, vocab_size: int) -> None:
        """Every id must be an embedding row of the model."""
        sample = np.asarray(self.tokens[: 1 << 22])  # a large prefix; a whole corpus would be slow
        check_vocab(sample, vocab_size, self.source)


class RandomTokens:
    """Uniform random ids in ``[low, high)``: the haystack where no text fits the vocabulary."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high
        self.source = f"random tokens [{low}, {high})"

    def take(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, dtype=np.int64)

    def check_vocab(self, vocab_size: int) -> None:
        if self.high > vocab_size:
            raise DataError(f"{self.source} exceeds the vocabulary ({vocab_size})")


def indexed_stream(prefix: str) -> tuple[TokenStream, TokenStore]:
    store = TokenStore(prefix)
    return TokenStream(store.tokens, f"indexed dataset {prefix}"), store


def builtin_text(max_chars: int) -> list[str]:
    """Text every machine has: the Python standard library's sources (what ``make demo`` trains
    on), file by file in sorted order, up to ``max_chars`` characters; deterministic for one
    Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idlelib"} & set(path.relative_to(root).parts):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


class Documents:
    """Documents in one token array: ``lengths`` and ``doc(d, start, end)``, as ``TokenStore``."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        self.tokens, self.lengths = tokens, lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def doc(self, d: int, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        end = self.lengths[d] if end is None else end
        return self.tokens[self.offsets[d] + start: self.offsets[d] + end]


def text_stream(tokenizer, tokens_needed: int) -> tuple[TokenStream, Documents]:
    """The built-in text, tokenised, one document per file: at least ``tokens_needed`` tokens
    where the standard library has them (about 4 characters per Llama-3 token on code), at most
    about 1M."""
    ids = tokenizer.encode(builtin_text(min(4_000_000, max(200_000, 6 * tokens_needed))))
    tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    return (TokenStream(tokens, "built-in text (Python standard library sources)"),
            Documents(tokens, np.array([len(x) for x in ids], dtype=np.int64)))


def long_windows(store: Optional[TokenStore | Documents], stream, length: int, count: int,
                 rng: np.random.Generator) -> tuple[list[np.ndarray], bool]:
    """``count`` windows of ``length + 1`` tokens for perplexity by position, and whether each is
    the start of one document (True) or a slice of concatenated text (False).

    Documents at least ``length + 1`` tokens long are used when the dataset has ``count`` of them
    (a seeded choice); otherwise slices of the token stream, documents concatenated.
    """
    if store is not None:
        long_docs = np.nonzero(store.lengths >= length + 1)[0]
        if len(long_docs) >= count:
            chosen = np.sort(rng.choice(long_docs, size=count, replace=False))
            return [np.asarray(store.doc(int(d), 0, length + 1), dtype=np.int64) for d in chosen], True
    return [stream.take(length + 1, rng) for _ in range(count)], False
