"""Which tokens of a packed sample each context-parallel rank holds, balanced for document masking.

With document masking a query attends the earlier tokens of its own document only, so its work
is its offset in the document + 1, and a document of ``n`` tokens costs ``n (n + 1) / 2`` pairs.
megatron's whole-sequence zigzag (``cp_layout.zigzag_positions``) balances plain causal attention,
not that: the ranks holding the late part of a long document do up to 2.6x the mean work on
ProLong's samples (``benchmarks/bench_cp_balance.py``). ``balanced_order`` splits each document
on its own, over as few ranks as balance allows:

- a document spread over ``g`` ranks is cut into ``2g`` chunks and the i-th of its ranks keeps
  chunks ``i`` and ``2g-1-i`` (a zigzag within the document: every one of them gets the same
  work). ``g`` is the fewest ranks that keep the document's work on each at most ``rank_share``
  of a rank's mean work (default 2%); short documents (``g = 1``) stay whole. Fewer, longer
  pieces fill the kernels' 128-token tiles: a 1K document cut into ``2*CP = 32`` slivers of 32
  tokens runs far below one.
- documents spread over every rank (``g = CP``: TE's THD split, without its padding) come first;
  their ``n mod 2CP`` extra tokens go to the chunks round-robin across documents, so the ranks'
  token counts differ by at most 2. Then the others, widest and largest first, each on the
  least-loaded ranks with room (rank capacities are exact: ``S / CP`` tokens): at most a
  ``rank_share`` of the mean lands on a rank that is among the least loaded, which bounds the
  busiest rank near ``1 + rank_share`` times the mean (measured <= 1.02 on ProLong-like mixes).
  A document that finds too few ranks with room is cut, from its start, over those that have.

One document filling the sample is split exactly as megatron's zigzag. The result is a
permutation ``order`` of the sample's positions: rank ``r`` holds ``order[r*S/CP:(r+1)*S/CP]``,
ascending. Plain numpy on the host: the layout is decided from the document lengths only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

RANK_SHARE = 0.02
"""Default ``rank_share``: the most work one document may put on a rank, as a fraction of a
rank's mean work (chosen with ``benchmarks/bench_cp_balance.py``; 0 spreads every document)."""


def doc_work(lengths) -> np.ndarray:
    """Query-key pairs of causal attention within each document: ``n (n + 1) / 2``."""
    n = np.asarray(lengths, dtype=np.int64)
    return n * (n + 1) // 2


def piece_work(offset, length) -> np.ndarray:
    """Pairs of the queries at document offsets ``offset .. offset+length-1`` (each attends its
    document's tokens up to itself)."""
    o, n = np.asarray(offset, dtype=np.int64), np.asarray(length, dtype=np.int64)
    return n * o + n * (n + 1) // 2


def zigzag_order(seq_length: int, cp_size: int) -> np.ndarray:
    """megatron's whole-sequence split as an order: rank ``r`` holds chunks ``r`` and ``2*CP-1-r``."""
    c = seq_length // (2 * cp_size)
    chunks = np.arange(seq_length).reshape(2 * cp_size, c)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * cp_size - 1 - r]]) for r in range(cp_size)])


def balanced_order(lengths: Sequence[int], cp_size: int, rank_share: float = RANK_SHARE) -> np.ndarray:
    """The balanced layout of a sample with documents of ``lengths`` (in order), as a permutation
    of its positions (see the module doc). ``sum(lengths)`` must be a multiple of ``2 * cp_size``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if cp_size < 1 or total % (2 * cp_size):
        raise ValueError(f"a sample of {total} tokens cannot be split into 2 x CP = {2 * cp_size} chunks")
    if cp_size == 1:
        return np.arange(total)
    starts = np.cumsum(lengths) - lengths
    work = doc_work(lengths)
    share = rank_share * work.sum() / cp_size
    ranks = np.full(lengths.size, cp_size) if share <= 0 else \
        np.clip(np.ceil(work / share), 1, cp_size).astype(np.int64)
    spread = ranks == cp_size
    # The documents spread over every rank can miss the even share by up to 2 tokens a rank;
    # the others must be able to absorb that.
    if lengths[~spread].sum() < 2 * cp_size:
        spread[:] = True
    pieces, load, used = _split_documents(starts[spread], lengths[spread], cp_size)
    capacity = total // cp_size - used
    if (capacity < 0).any():  # not with >= 2 CP such tokens; never leave a rank short
        return balanced_order(lengths, cp_size, rank_share=0.0)
    rest = np.nonzero(~spread)[0]
    rest = rest[np.lexsort((-(work[rest] // ranks[rest]), -ranks[rest]))]  # widest, then largest share first
    for d in rest.tolist():
        _place_group(pieces, load, capacity, int(starts[d]), int(lengths[d]), int(ranks[d]))
    order = np.concatenate([_ranges(sorted(p)) for p in pieces])
    if order.size != total:  # pragma: no cover - guarded by the capacities above
        raise AssertionError("balanced_order lost tokens")
    return order


def _split_documents(starts, lengths, cp_size):
    """Each document in ``2*CP`` chunks, rank r taking chunks r and 2CP-1-r. The ``n mod 2CP``
    extra tokens of a document go to the chunks round-robin, continuing across documents, so the
    chunk totals differ by at most one token. Returns (pieces per rank as (start, length), work
    per rank, tokens per rank)."""
    slots = 2 * cp_size
    owner = np.array([j if j < cp_size else slots - 1 - j for j in range(slots)])
    pieces = [[] for _ in range(cp_size)]
    load = np.zeros(cp_size, dtype=np.int64)
    used = np.zeros(cp_size, dtype=np.int64)
    turn = 0
    for start, n in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist()):
        base, extra = divmod(n, slots)
        sizes = np.full(slots, base, dtype=np.int64)
        sizes[(turn + np.arange(extra)) % slots] += 1
        turn = (turn + extra) % slots
        offsets = np.cumsum(sizes) - sizes
        np.add.at(load, owner, piece_work(offsets, sizes))
        np.add.at(used, owner, sizes)
        for j in np.nonzero(sizes)[0].tolist():
            pieces[owner[j]].append((start + int(offsets[j]), int(sizes[j])))
    return pieces, load, used


def _place_group(pieces, load, capacity, start: int, n: int, g: int) -> None:
    """The document [start, start+n) over the ``g`` least-loaded ranks with room, zigzag among
    them (``2g`` chunks; g = 1: whole), or, if fewer ranks have room, in pieces from its start
    to the least-loaded ranks with room."""
    sizes = np.full(2 * g, n // (2 * g), dtype=np.int64)
    sizes[: n % (2 * g)] += 1
    need = sizes[:g] + sizes[::-1][:g]  # chunk i and 2g-1-i
    room = capacity >= need.max()
    if room.sum() >= g:
        chosen = np.argsort(np.where(room, load, np.iinfo(np.int64).max), kind="stable")[:g]
        offsets = np.cumsum(sizes) - sizes
        for i, r in enumerate(chosen.tolist()):
            for j in (i, 2 * g - 1 - i):
                if sizes[j]:
                    pieces[r].append((start + int(offsets[j]), int(sizes[j])))
                    load[r] += piece_work(offsets[j], sizes[j])
                    capacity[r] -= sizes[j]
        return
    offset = 0
    while offset < n:
        r = int(np.argmin(np.where(capacity > 0, load, np.iinfo(np.int64).max)))
        k = int(min(capacity[r], n - offset))
        pieces[r].append((start + offset, k))
        load[r] += piece_work(offset, k)
        capacity[r] -= k
        offset += k


def _ranges(pieces) -> np.ndarray:
    """Positions of (start, length) pieces, concatenated."""
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    starts = np.array([s for s, _ in pieces], dtype=np.int64)
    lens = np.array([n for _, n in pieces], dtype=np.int64)
    first = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    return first + np.arange(int(lens.sum()), dtype=np.int64)


def rank_work(order: np.ndarray, lengths: Sequence[int], cp_size: int) -> np.ndarray:
    """Attention work (query-key pairs) of each rank under ``order``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    doc_start = np.repeat(starts, lengths)
    per_token = np.asarray(order) - doc_start[np.asarray(order)] + 1
    return per_token.reshape(cp_size, -1).sum(axis=1)
