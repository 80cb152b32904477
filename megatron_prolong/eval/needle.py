"""Needle-in-a-haystack retrieval cases: a token-level core with two front-ends.

A case is one window of ``length + 1`` tokens::

    [haystack ... needle ... haystack (+ distractor needles)] [query] [answer]

The answer sits at the very end, so ``labels[-answer_len:]`` are its tokens and the loss mask
selects exactly them. The model is scored without generating: the sum of the answer tokens'
log-probabilities, and greedy exact match, which under teacher forcing is "the argmax at every
answer position is the answer token" (greedy decoding would then produce the answer verbatim).

Front-ends build the needle, query and answer tokens:

- ``KeyValueTask`` (any vocabulary, e.g. the 512-token debug models): ``num_needles`` needles
  ``[NEEDLE, key, value]`` with distinct keys and values; the query ``[QUERY, key]`` asks for the
  value of the needle placed at the requested depth; the other needles are distractors. The
  single-token answer also gets a choice score: is its logit the highest among all ``span``
  value tokens? A model that does not read the context scores chance, ``1 / span``; one that
  copies some value of the context but not the asked one, ``1 / num_needles``.
- ``PasskeyTask`` (a real tokenizer, e.g. Llama-3's): the passkey test of Mohtashami & Jaggi
  (2023): "The pass key is 71432. Remember it. 71432 is the pass key." hidden in real text, then
  "What is the pass key? The pass key is" -> " 71432".

Depth ``d`` in [0, 1] puts the needle after ``round(d * H)`` of the ``H`` haystack tokens; needles
go between haystack tokens (never inside each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class NeedleCase:
    window: np.ndarray
    """int64 [length + 1]: context, query and answer (``window[-answer_len:]`` is the answer)."""
    answer_len: int
    depth: float
    needle_start: int
    """Window position where the needle asked for begins."""
    candidates: Optional[np.ndarray] = None
    """Single-token answers: the token ids to choose among (the answer included)."""

    @property
    def length(self) -> int:
        """Context length in tokens (what the model sees)."""
        return len(self.window) - 1

    @property
    def answer(self) -> np.ndarray:
        return self.window[-self.answer_len:]

    def sample(self) -> dict:
        """The dataset sample contract (``megatron_prolong.data.batch``): one document, loss on
        the answer tokens only."""
        loss_mask = np.zeros(self.length, dtype=np.float32)
        loss_mask[-self.answer_len:] = 1.0
        return {"tokens": self.window[:-1], "labels": self.window[1:], "loss_mask": loss_mask,
                "cu_seqlens": np.array([0, self.length], dtype=np.int32)}


class Haystack(Protocol):
    def take(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


def assemble(haystack: Haystack, needle: np.ndarray, tail: np.ndarray, answer_len: int, *, length: int,
             depth: float, rng: np.random.Generator, distractors: Sequence[np.ndarray] = (),
             candidates: Optional[np.ndarray] = None) -> NeedleCase:
    """One case of ``length`` context tokens: haystack with the needle at ``depth`` and the
    distractors at random places, then ``tail`` (query + answer, the answer its last
    ``answer_len`` tokens)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    inserted = len(needle) + sum(len(d) for d in distractors)
    n_hay = length + 1 - inserted - len(tail)
    if n_hay < 1:
        raise ValueError(f"context length {length} is too short for the needle task: the needles, query and "
                         f"answer alone take {length + 1 - n_hay} tokens; use longer --lengths")
    hay = np.asarray(haystack.take(n_hay, rng), dtype=np.int64)
    at = int(round(depth * n_hay))
    # Distractors go to other gaps of the haystack (a gap is "before haystack token i").
    gaps = rng.integers(0, n_hay + 1, size=len(distractors))  # needles may share a gap, in turn
    inserts = sorted([(at, 0, needle)] + [(int(g), 1 + k, d) for k, (g, d) in enumerate(zip(gaps, distractors))],
                     key=lambda x: (x[0], x[1]))
    parts, prev, needle_start, pos = [], 0, -1, 0
    for gap, kind, tokens in inserts:
        parts.append(hay[prev:gap])
        pos += gap - prev
        if kind == 0:
            needle_start = pos
        parts.append(np.asarray(tokens, dtype=np.int64))
        pos += len(tokens)
        prev = gap
    parts.append(hay[prev:])
    parts.append(np.asarray(tail, dtype=np.int64))
    window = np.concatenate(parts)
    assert len(window) == length + 1
    return NeedleCase(window=window, answer_len=answer_len, depth=depth, needle_start=needle_start,
                      candidates=None if candidates is None else np.asarray(candidates, dtype=np.int64))


class KeyValueTask:
    """Synthetic token-level retrieval: needles ``[NEEDLE, key, value]``, query ``[QUERY, key]``.

    Token ids: 0 is left alone (padding), ``NEEDLE = 1``, ``QUERY = 2``; keys and values come
    from two disjoint ranges of ``span`` ids each, starting at 4; the rest of the vocabulary is
    the default haystack range (``haystack_range``). A small ``span`` keeps the task learnable by
    a tiny model in a few hundred steps (``benchmarks/bench_retrieval.py``).
    """

    name = "kv"
    NEEDLE, QUERY = 1, 2

    def __init__(self, vocab_size: int, num_needles: int = 4, span: int = 16):
        if num_needles < 1 or 4 + 2 * span >= vocab_size or span < num_needles:
            raise ValueError(f"a vocabulary of {vocab_size} tokens cannot hold {num_needles} needles with "
                             f"{span} keys and values each")
        self.vocab_size, self.num_needles, self.span = vocab_size, num_needles, span
        self.keys = np.arange(4, 4 + span)
        self.values = np.arange(4 + span, 4 + 2 * span)
        self.haystack_range = (4 + 2 * span, vocab_size)

    @property
    def chance(self) -> float:
        """Choice accuracy of a model that does not read the context."""
        return 1.0 / self.span

    def case(self, haystack: Haystack, *, length: int, depth: float, rng: np.random.Generator) -> NeedleCase:
        keys = rng.choice(self.keys, size=self.num_needles, replace=False)
        values = rng.choice(self.values, size=self.num_needles, replace=False)
        needles = [np.array([self.NEEDLE, k, v]) for k, v in zip(keys, values)]
        tail = np.array([self.QUERY, keys[0], values[0]])
        return assemble(haystack, needles[0], tail, 1, length=length, depth=depth, rng=rng,
                        distractors=needles[1:], candidates=self.values)


    def training_window(self, haystack: Haystack, *, length: int, rng: np.random.Generator,
                        num_needles: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(window, target mask) for training: ``num_needles`` needles at random places, then a
        query for every one of them in random order, each value a target (a denser signal than
        the single query of an evaluation case)."""
        k = num_needles or self.num_needles
        keys = rng.choice(self.keys, size=k, replace=False)
        values = rng.choice(self.values, size=k, replace=False)
        order = rng.permutation(k)
        tail = np.stack([np.full(k, self.QUERY), keys[order], values[order]], axis=1).reshape(-1)
        needles = [np.array([self.NEEDLE, a, b]) for a, b in zip(keys, values)]
        case = assemble(haystack, needles[0], tail, 1, length=length, depth=float(rng.random()), rng=rng,
                        distractors=needles[1:])
        mask = np.zeros(len(case.window), dtype=np.uint8)
        mask[len(case.window) - len(tail) + 2::3] = 1
        return case.window, mask


class PasskeyTask:
    """The passkey test in text, through a tokenizer with ``encode(list[str]) -> list[list[int]]``."""

    name = "passkey"
    chance = 0.0  # a 5-digit key guessed at random: 1e-5
    NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
    QUERY = " What is the pass key? The pass key is"

    def __init__(self, tokenizer, digits: int = 5):
        self.tokenizer, self.digits = tokenizer, digits

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode([text])[0], dtype=np.int64)

    def query_and_answer(self, key: int) -> tuple[np.ndarray, int]:
        """Tokens of query + answer and the answer's token count, cut where the joint encoding
        of query and answer has its boundary (so the answer is tokenised as it would be in text)."""
        query = self._encode(self.QUERY)
        full = self._encode(f"{self.QUERY} {key}")
        if not np.array_equal(full[:len(query)], query):  # the boundary merged: encode apart
            full = np.concatenate([query, self._encode(f" {key}")])
        return full, len(full) - len(query)

    def case(self, haystack: Haystack, *, length: int, depth: float, rng: np.random.Generator) -> NeedleCase:
        key = int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits))
        tail, answer_len = self.query_and_answer(key)
        return assemble(haystack, self._encode(self.NEEDLE.format(key=key)), tail, answer_len,
                        length=length, depth=depth, rng=rng)


def build_cases(task, haystack: Haystack, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
                seed: int) -> list[NeedleCase]:
    """The grid ``lengths x depths x per_cell``, deterministic in ``seed`` (each cell has its own
    generator, so adding lengths does not change the cases of the others)."""
    cases = []
    for length in lengths:
        for d, depth in enumerate(depths):
            rng = np.random.default_rng([seed, int(length), d])
            cases.extend(task.case(haystack, length=int(length), depth=float(depth), rng=rng)
                         for _ in range(per_cell))
    return cases


def retrieval_grid(cases: Sequence[NeedleCase], scores) -> list[dict]:
    """Per (length, depth) cell: greedy exact match, mean answer log-probability (nats, summed
    over the answer's tokens) and, where the cases have candidates, choice accuracy. ``scores``:
    the ``Scores`` of the cases' samples, in order, with ``top1``."""
    cells: dict[tuple[int, float], list[int]] = {}
    for i, c in enumerate(cases):
        cells.setdefault((c.length, c.depth), []).append(i)
    out = []
    for (length, depth), idx in sorted(cells.items()):
        idx = np.asarray(idx)
        cell = {"length": length, "depth": depth, "cases": len(idx),
                "exact_match": float(np.mean(scores.sample_mismatches[idx] == 0)),
                "answer_logprob": float(-np.mean(scores.sample_loss[idx]))}
        if scores.sample_choice_correct is not None:
            cell["choice_accuracy"] = float(np.mean(scores.sample_choice_correct[idx] > 0))
        out.append(cell)
    return out


def mean_by_length(cells: Sequence[dict], metric: str) -> dict[int, float]:
    """A metric averaged over depths, per context length (cells have equal case counts)."""
    lengths = sorted({c["length"] for c in cells})
    return {n: float(np.mean([c[metric] for c in cells if c["length"] == n])) for n in lengths}


def write_needle_dataset(task: KeyValueTask, haystack: Haystack, prefix: str, *, length: int, count: int,
                         seed: int, num_needles: Optional[int] = None) -> None:
    """``count`` training windows of ``length + 1`` tokens (``task.training_window``) as an SFT
    indexed dataset (loss on the values only; one window per sample at ``train.seq_length =
    length``): a retrieval task to train a tiny model on, to check that this harness sees what
    the model learned."""
    from ..data.indexed import AtomicIndexedWriter

    rng = np.random.default_rng([seed, 0x7EED])
    writer = AtomicIndexedWriter(prefix, with_mask=True)
    try:
        for _ in range(count):
            window, mask = task.training_window(haystack, length=length, rng=rng, num_needles=num_needles)
            writer.add(window, mask)  # a mask entry marks its token as a training target
        writer.commit()
    except BaseException:
        writer.abort()
        raise
