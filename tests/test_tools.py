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
