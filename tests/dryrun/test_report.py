"""The dry-run report's analytic pieces, against brute force."""

from __future__ import annotations

import pytest

from megatron_prolong.dryrun.report import rank_attention_pairs
from megatron_prolong.parallel.cp_layout import zigzag_positions


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("documents", [[64], [10, 30, 24], [1, 1, 62], [33, 31]])
def test_rank_attention_pairs_count_each_query_against_its_document_so_far(cp, documents):
    S = sum(documents)
    doc_of = [d for d, n in enumerate(documents) for _ in range(n)]
    total = 0
    for rank in range(cp):
        expected = sum(1 for q in zigzag_positions(S, cp, rank).tolist() for k in range(q + 1)
                       if doc_of[k] == doc_of[q])
        got = rank_attention_pairs(S, cp, rank, documents)
        assert got == expected
        total += got
    assert total == sum(n * (n + 1) // 2 for n in documents)  # every pair on exactly one CP rank
