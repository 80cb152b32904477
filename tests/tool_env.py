"""The environment for running a tool as users do, ``python tools/<name>.py``, from a test."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tool_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with this checkout first on PYTHONPATH: ``tools/<name>.py``
    imports the package as installed, and an editable install may point at another checkout."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env
