"""The ProLong data mixtures, as data: domain name -> share of training tokens.

Domain names are the folder names of ProLong's released MDS data, exactly as the release's scripts
read them (princeton-nlp/ProLong ``train_64K.sh``, ``train_512K.sh``, ``train_sft.sh``):

* stage 1 reads ``datasets/long-context-65536/<domain>``, a clone of the HF dataset
  ``princeton-nlp/prolong-data-64K``;
* stage 2 reads every domain, the 64K pieces included, from ``datasets/long-context-524288``, a
  clone of ``princeton-nlp/prolong-data-512K``, which holds both ``book-524288`` and
  ``book-65536`` (and both code folders) next to the short-data folders;
* SFT reads ``datasets/prolong-ultrachat-64K``, a clone of ``princeton-nlp/prolong-ultrachat-64K``.

``tools/mds_to_indexed.py --input <clone> --output-prefix P`` writes one dataset per folder,
``P.<folder>``, and :func:`resolve_mixture` reads a mixture from those. (The first versions of
``train_512K.sh`` named the long folders ``thestackv1_concat_by_repo2-*`` / ``book2-*``; the script
was corrected in commit cb37ee6 to the names the HF data uses, which are the names here.)

Weights are token shares: every sample holds ``seq_length`` tokens of one domain, so sample shares
equal token shares.

Long data. A domain named ``<source>-<N>`` with ``N`` a power of two of at least 8192 is long data
meant to supply ``N``-token documents (ProLong's README packs long data with datatools'
``pack --pack_length N --min_length N``: ``book-65536`` holds 64K-token pieces, ``book-524288`` 512K);
:func:`intended_doc_length` reads that, and the dataset build warns when such a domain cannot fill
the context it is used at (see ``dataset.long_context_warnings``). Other domains are short data.
"""

from __future__ import annotations

import re

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
    # Stage 1, 64K (train_64K.sh): code repos 30%, books 30%, textbooks 3%, short data 37%.
    "prolong-64k": {
        "thestackv1_concat_by_repo-65536": 0.30,
        "book-65536": 0.30,
        "textbooks": 0.03,
        **_SHORT,
    },
    # Stage 2, 512K (train_512K.sh): code 15% as 512K documents + 15% as 64K pieces, books 5% at
    # 512K + 25% at 64K, textbooks, short data unchanged; all folders from prolong-data-512K.
    "prolong-512k": {
        "thestackv1_concat_by_repo-524288": 0.15,
        "thestackv1_concat_by_repo-65536": 0.15,
        "book-524288": 0.05,
        "book-65536": 0.25,
        "textbooks": 0.03,
        **_SHORT,
    },
    # SFT (train_sft.sh): UltraChat only, loss on assistant tokens.
    "prolong-sft": {"prolong-ultrachat-64K": 1.0},
}
MIXTURES["prolong-stage1"] = MIXTURES["prolong-64k"]
MIXTURES["prolong-stage2"] = MIXTURES["prolong-512k"]

_LONG_SUFFIX = re.compile(r"-(\d+)$")
_MIN_LONG = 8192


def domain_of(prefix: str) -> str:
    """The domain of a dataset prefix ``P.<domain>`` (its file name after the last '.')."""
    return prefix.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def intended_doc_length(domain: str) -> int | None:
    """Document length (tokens) a long domain is meant to supply, from its ``-<N>`` suffix
    (``book-524288`` -> 524288); None for short data (``fineweb-2023-50``, ``textbooks``).
    A dataset prefix ``P.<domain>`` works as well."""
    m = _LONG_SUFFIX.search(domain_of(domain))
    if m is None:
        return None
    n = int(m.group(1))
    return n if n >= _MIN_LONG and n & (n - 1) == 0 else None


def resolve_mixture(name: str, data_prefix: str) -> list[dict]:
    """``[{"prefix": f"{data_prefix}.{domain}", "weight": w}, ...]`` for a named mixture."""
    from .mds import safe_domain

    if name not in MIXTURES:
        raise KeyError(f"unknown mixture {name!r}; known: {sorted(MIXTURES)}")
    return [{"prefix": f"{data_prefix}.{safe_domain(d)}", "weight": w}
            for d, w in MIXTURES[name].items()]
