"""The recipes say what they read: the data commands in a recipe's comments write the prefixes its
mixture resolves to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_prolong.config import load_config
from megatron_prolong.data.mixtures import resolve_mixture

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _written_prefixes(text: str, domains: list[str]) -> set[str]:
    """Dataset prefixes the commented commands write: ``mds_to_indexed`` over a root of released
    folders writes ``PREFIX.<folder>`` (one per mixture domain); other tools write ``PREFIX``."""
    out = set()
    for command in re.split(r"\n#\s{2,}(?=python )", text):
        m = re.search(r"--output-prefix\s+(\S+)", command)
        if not m:
            continue
        prefix = m.group(1)
        if "mds_to_indexed" in command and "--mixture" in command:
            out.update(f"{prefix}.{d}" for d in domains)
        else:
            out.add(prefix)
    return out


@pytest.mark.parametrize("recipe", ["prolong_64k.yaml", "prolong_512k.yaml", "prolong_sft.yaml"])
def test_commented_data_commands_write_what_the_mixture_reads(recipe):
    from megatron_prolong.data.mixtures import MIXTURES

    text = (EXAMPLES / recipe).read_text()
    cfg = load_config(EXAMPLES / recipe, ["checkpoint.init_from=null"])
    read = {e["prefix"] for e in resolve_mixture(cfg.data.mixture, cfg.data.data_prefix)}
    written = _written_prefixes(text, list(MIXTURES[cfg.data.mixture]))
    assert written, f"{recipe} has no data command in its comments"
    assert read <= written, f"{recipe} reads {sorted(read - written)} that its commands do not write"
