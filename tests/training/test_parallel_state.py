"""Process groups: the two-level CP groups TE's a2a+p2p takes are built when sizes are given."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


def _hierarchical_groups(sizes):
    from megatron.core import parallel_state

    from megatron_prolong.parallel import destroy, initialize

    initialize(1, 1, 2, device="cpu", hierarchical_cp_sizes=sizes)
    try:
        groups = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
        return None if groups is None else [g.size() for g in groups]
    finally:
        destroy()


def test_hierarchical_cp_groups_are_built():
    assert run_distributed(_hierarchical_groups, 2, ([2, 1],)) == [[2, 1], [2, 1]]
    assert run_distributed(_hierarchical_groups, 2, (None,)) == [None, None]
