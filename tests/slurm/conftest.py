"""The ``cluster`` fixture: a real Slurm cluster for the module's tests (tests/slurm/cluster.py),
skipped with the reason where one cannot be started (not root, Slurm missing and apt-get unable to
install it, no network namespaces)."""

from __future__ import annotations

import pytest

from tests.slurm import cluster as slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm.unavailable() or slurm.install()
    if reason:
        pytest.skip(f"real Slurm cluster: {reason}")
    c = slurm.Cluster(tmp_path_factory.mktemp("slurm"), cpu_nodes=("n1", "n2"), gpu_nodes=("g1", "g2"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
