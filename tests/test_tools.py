"""Every tool is ``python tools/<name>.py`` and the console script ``prolong-<name>``, both calling
the one ``main()`` of ``megatron_prolong.tools.<name>``."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys

from megatron_prolong.tools import TOOLS
from tests.tool_env import ROOT, tool_env


def test_every_tool_module_has_main_and_a_console_script():
    found = sorted(p.stem for p in (ROOT / "megatron_prolong" / "tools").glob("*.py") if p.stem != "__init__")
    assert sorted(TOOLS) == found
    setup = (ROOT / "setup.py").read_text()
    listed = re.findall(r'"(\w+)"', setup[setup.index("console_scripts"):setup.index("extras_require")])
    assert sorted(listed) == found
    for name in TOOLS:
        assert callable(importlib.import_module(f"megatron_prolong.tools.{name}").main)


def test_every_tool_runs_as_a_top_level_script():
    """``tools/<name>.py`` imports the package's main (no sys.path edits) and runs it."""
    assert sorted(p.stem for p in (ROOT / "tools").glob("*.py")) == sorted(TOOLS)
    for name in TOOLS:
        source = (ROOT / "tools" / f"{name}.py").read_text()
        imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
        assert [(n.module, [a.name for a in n.names]) for n in imports] == [(f"megatron_prolong.tools.{name}", ["main"])]
        assert "sys.path" not in source
    for name in TOOLS:
        out = subprocess.run([sys.executable, f"tools/{name}.py", "--help"], cwd=ROOT, env=tool_env(),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (name, out.stderr[-2000:])


def test_quieting_drops_only_the_known_notices():
    """The tools' entry quiets torch's and megatron-core's import-time notices by message; other
    warnings and other records of the same logger still show."""
    import logging
    import warnings

    from megatron_prolong.platform import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("a real problem")
    assert [str(w.message) for w in caught] == ["a real problem"]

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error building extension 'x'")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Error building extension 'x'"]
