"""The recipes say what they read: the data-preparation command in a recipe's comment writes the
prefixes its mixture resolves to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_prolong.config import load_config
from megatron_prolong.data.mixtures import resolve_mixture

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("recipe", ["prolong_sft.yaml"])
def test_commented_data_command_writes_what_the_mixture_reads(recipe):
    text = (EXAMPLES / recipe).read_text()
    written = re.findall(r"--output-prefix\s+(\S+)", text)
    assert written, f"{recipe} has no data command in its comments"
    cfg = load_config(EXAMPLES / recipe, ["checkpoint.init_from=null"])
    read = [e["prefix"] for e in resolve_mixture(cfg.data.mixture, cfg.data.data_prefix)]
    assert sorted(read) == sorted(written)
