"""The Docker base's versions (docker/base_versions.env) against megatron-core 0.16.1's and the
project's requirements, with the same code the Dockerfile runs at build time (docker/check_base.py).
No Docker engine here: this checks the logic and the recorded versions, not a build."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docker"))
import check_base  # noqa: E402

ENV = check_base.read_env(ROOT / "docker" / "base_versions.env")


def test_recorded_base_fits_the_requirements():
    assert check_base.problems(check_base.recorded_versions(ENV)) == []
    assert check_base.main(["--env", str(ROOT / "docker" / "base_versions.env")]) == 0


def test_dockerfile_builds_from_the_recorded_base_and_checks_it():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, re.M)
    assert base and base.group(1) == ENV["BASE_IMAGE"]
    # The check runs before the install (fail fast) and after it (torch kept).
    runs = [m.start() for m in re.finditer(r"python docker/check_base\.py", dockerfile)]
    assert len(runs) == 2 and runs[0] < dockerfile.index("pip install") < runs[1]


@pytest.mark.parametrize("torch, te, python, broken", [
    ("2.6.0a0+ecf3bae40a", "2.9.0", "3.12.3", "torch 2.6.0a0"),         # NGC 25.01: PEP 440 puts a0 before 2.6.0
    ("2.10.0a0+b558c986e8.nv25.11", "2.8.0", "3.12.3", "transformer-engine 2.8.0"),
    ("2.10.0a0+b558c986e8.nv25.11", "2.12.0", "3.12.3", "transformer-engine 2.12.0"),
    ("2.10.0a0+b558c986e8.nv25.11", "2.9.0+abc", "3.9.18", "python 3.9.18"),
])
def test_bases_that_do_not_fit_are_refused(torch, te, python, broken):
    found = check_base.problems({"torch": torch, "transformer-engine": te, "python": python})
    assert any(p.startswith(broken) for p in found), found


def test_requirement_ranges_are_megatron_cores_own():
    """The ranges check_base.py holds are the installed megatron-core 0.16.1's metadata."""
    assert metadata.version("megatron-core") == "0.16.1"
    assert metadata.metadata("megatron-core")["Requires-Python"] == check_base.MEGATRON_CORE_REQUIREMENTS["python"]
    reqs = metadata.requires("megatron-core")
    assert f"torch{check_base.MEGATRON_CORE_REQUIREMENTS['torch']}" in reqs
    te = [r for r in reqs if r.startswith("transformer-engine") and 'extra == "dev"' in r]
    assert te, reqs
    spec = re.search(r"\]([^;]+);", te[0]).group(1).strip()
    assert set(spec.split(",")) == set(check_base.MEGATRON_CORE_REQUIREMENTS["transformer-engine"].split(","))
