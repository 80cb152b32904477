"""The ProLong data mixtures, as data: domain name -> share of training tokens.

Domain names are the folder names of ProLong's released MDS data (``long-context-65536/<domain>``,
``long-context-524288/<domain>``, princeton-nlp/ProLong train_64K.sh / train_512K.sh), which
``tools/mds_to_indexed.py --split-by-domain`` turns into ``PREFIX.<domain>`` datasets; a mixture is
resolved against such a prefix by :func:`resolve_mixture`. Weights are token shares: every sample
holds ``seq_length`` tokens of one domain, so sample shares equal token shares.
"""

from __future__ import annotations

# Short data shared by both stages (37% of tokens).
_SHORT = {
    "fineweb-edu": 0.10,
    "fineweb-2023-50": 0.10,
    "stackexchange": 0.04,
    "dolmawiki": 0.04,
    "tuluv2": 0.03,
    "arxiv": 0.03,
    "openwebmath": 0.03,
}

MIXTURES: dict[str, dict[str, float]] = {
    # Stage 1, 64K: code repos 30%, books 30%, textbooks 3%, short data 37%.
    "prolong-64k": {
        "thestackv1_concat_by_repo-65536": 0.30,
        "book-65536": 0.30,
        "textbooks": 0.03,
        **_SHORT,
    },
    # Stage 2, 512K: code 15% at 512K + 15% at 64K, books 5% at 512K + 25% at 64K, textbooks,
    # short data unchanged. (The released script names the long folders "...repo2-..."/"book2-...";
    # rename the prefixes or pass an explicit blend if your copy uses those names.)
    "prolong-512k": {
        "thestackv1_concat_by_repo-524288": 0.15,
        "thestackv1_concat_by_repo-65536": 0.15,
        "book-524288": 0.05,
        "book-65536": 0.25,
        "textbooks": 0.03,
        **_SHORT,
    },
    # SFT: UltraChat only (prolong-ultrachat-64K), loss on assistant tokens.
    "prolong-sft": {"ultrachat": 1.0},
}
MIXTURES["prolong-stage1"] = MIXTURES["prolong-64k"]
MIXTURES["prolong-stage2"] = MIXTURES["prolong-512k"]


def resolve_mixture(name: str, data_prefix: str) -> list[dict]:
    """``[{"prefix": f"{data_prefix}.{domain}", "weight": w}, ...]`` for a named mixture."""
    from .mds import safe_domain

    if name not in MIXTURES:
        raise KeyError(f"unknown mixture {name!r}; known: {sorted(MIXTURES)}")
    return [{"prefix": f"{data_prefix}.{safe_domain(d)}", "weight": w}
            for d, w in MIXTURES[name].items()]
