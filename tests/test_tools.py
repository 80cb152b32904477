"""Every tool is a module of megatron_prolong.tools with a main(), and a console script."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from megatron_prolong.tools import TOOLS

ROOT = Path(__file__).resolve().parents[1]


def test_every_tool_module_has_main_and_a_console_script():
    found = sorted(p.stem for p in (ROOT / "megatron_prolong" / "tools").glob("*.py") if p.stem != "__init__")
    assert sorted(TOOLS) == found
    setup = (ROOT / "setup.py").read_text()
    listed = re.findall(r'"(\w+)"', setup[setup.index("console_scripts"):setup.index("extras_require")])
    assert sorted(listed) == found
    for name in TOOLS:
        assert callable(importlib.import_module(f"megatron_prolong.tools.{name}").main)
