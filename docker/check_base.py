#!/usr/bin/env python
"""Check a base image's torch / Transformer Engine / Python against what megatron-prolong and
megatron-core 0.16.1 require, the way pip compares versions (PEP 440). Used by docker/Dockerfile at
build time (versions read from the image) and by tests/unit/test_docker_versions.py (versions
from docker/base_versions.env), so the next base bump is checked before anyone builds.

    python docker/check_base.py                 # the installed torch / TE / Python
    python docker/check_base.py --env FILE      # the versions recorded in base_versions.env

Why it matters: NGC's torch reports pre-release versions such as ``2.6.0a0+ecf3bae40a`` (25.01),
which PEP 440 orders *before* 2.6.0, so megatron-core's ``torch>=2.6.0`` is unmet and pip, told to
keep the image's torch, fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# From megatron-core 0.16.1's own metadata (Requires-Python, Requires-Dist; TE from its "dev"
# extra, i.e. the versions it is developed and tested against). The test re-reads them from the
# installed megatron-core so that they cannot drift from it.
MEGATRON_CORE_REQUIREMENTS = {
    "python": ">=3.10",
    "torch": ">=2.6.0",
    "transformer-engine": ">=2.9.0a0,<2.12.0",
}


def project_requirements(setup_py: Path = ROOT / "setup.py") -> dict[str, str]:
    """megatron-prolong's own torch and Python requirements, read from setup.py."""
    text = setup_py.read_text()
    torch = re.search(r'"torch([<>=!~][^"]*)"', text)
    python = re.search(r'python_requires="([^"]+)"', text)
    if not torch or not python:
        raise SystemExit(f"{setup_py}: no torch requirement / python_requires found")
    return {"torch": torch.group(1), "python": python.group(1)}


def satisfies(version: str, spec: str) -> bool:
    # prereleases=True: pip accepts an installed pre-release that falls inside the range; the
    # ordering (2.6.0a0 < 2.6.0) still applies.
    return SpecifierSet(spec).contains(Version(version), prereleases=True)


def problems(versions: dict[str, str]) -> list[str]:
    """What in ``versions`` ({"torch", "transformer-engine", "python"}) breaks a requirement."""
    out = []
    required = [("megatron-core 0.16.1", MEGATRON_CORE_REQUIREMENTS), ("megatron-prolong", project_requirements())]
    for who, reqs in required:
        for package, spec in reqs.items():
            have = versions.get(package)
            if have is None:
                out.append(f"{package}: not found (needed by {who}: {spec})")
            elif not satisfies(have, spec):
                out.append(f"{package} {have} does not satisfy {who}'s {package}{spec} (PEP 440 order)")
    return out


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def recorded_versions(env: dict[str, str]) -> dict[str, str]:
    return {"torch": env["BASE_TORCH"], "transformer-engine": env["BASE_TE"], "python": env["BASE_PYTHON"]}


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    import torch

    versions = {"torch": torch.__version__, "python": ".".join(map(str, sys.version_info[:3]))}
    for dist in ("transformer-engine", "transformer_engine"):
        try:
            versions["transformer-engine"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", type=Path, help="check the versions recorded in this base_versions.env")
    args = ap.parse_args(argv)
    versions = recorded_versions(read_env(args.env)) if args.env else installed_versions()
    found = problems(versions)
    if not args.env:  # in the image: say when it is not the base the env file describes
        env = read_env(Path(__file__).with_name("base_versions.env"))
        if versions.get("torch") != env["BASE_TORCH"]:
            print(f"note: this image's torch is {versions.get('torch')}, base_versions.env records "
                  f"{env['BASE_TORCH']} ({env['BASE_IMAGE']}); update the file with the base")
    if found:
        print("base image does not fit megatron-prolong:\n  - " + "\n  - ".join(found)
              + "\nchoose another NGC PyTorch release (docker/README.md)", file=sys.stderr)
        return 1
    print("base image versions OK: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
