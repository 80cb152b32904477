"""``DataConfig``: what the trainer tells the data pipeline (see ``build_train_dataset``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

BlendSpec = Union[dict, list, None]


@dataclass
class DataConfig:
    """Training data: a synthetic mock, an explicit blend of indexed datasets, or a named mixture."""

    blend: BlendSpec = None
    """Indexed datasets and their token shares. Any of: ``{"path/prefix": weight, ...}``;
    ``[{"prefix": "path/prefix", "weight": w}, ...]`` (``path`` works as well as ``prefix``);
    ``["prefixA", "prefixB"]`` (equal weights). Prefixes are given without ``.bin``/``.idx``.
    Weights need not sum to 1 (they are normalised)."""

    mixture: str | None = None
    """Name of a recipe mixture from ``megatron_prolong.data.mixtures.MIXTURES`` (e.g.
    ``prolong-64k``, ``prolong-512k``, ``prolong-sft``); needs ``data_prefix``."""

    data_prefix: str | None = None
    """Prefix the mixture's domains hang off: domain ``d`` is read from ``{data_prefix}.{d}``,
    which is what ``tools/mds_to_indexed.py --input <root of domain folders> --output-prefix
    data_prefix`` writes (one dataset per released folder, e.g. ``{data_prefix}.book-65536``)."""

    mock: bool = False
    """Serve synthetic samples (``MockDataset``); no files needed."""

    mock_mean_doc_length: int | None = None
    """Mean document length of the mock data (default: a third of the sequence length)."""

    sft: bool = False
    """SFT packing: whole conversations per sample, no carry-over into the next sample, padding,
    and the loss-mask dataset ``PREFIX_mask`` is required next to every prefix."""

    length_sorted: bool = False
    """Order each global batch by attention cost (sum of squared document lengths, ProLong's
    length-sorted batching); the trainer applies ``order_global_batch`` when this is set."""

    shuffle_samples: bool = True
    """Serve each dataset's samples in a seeded random order within every epoch (consecutive
    windows of a long document would otherwise land in the same global batch)."""

    pad_token_id: int = 0
    """Token id written into SFT padding (its loss is masked, so any valid id works)."""

    valid_blend: BlendSpec = None
    """Validation datasets (held-out documents, never in the training prefixes), in any form
    ``blend`` takes; their weights set each dataset's share of ``eval.samples``. The validation
    loss is reported per dataset and overall (see the ``eval`` section of the config)."""

    valid_data_prefix: str | None = None
    """With ``mixture``: validation data laid out like ``data_prefix`` (``tools/mds_to_indexed.py
    --split-by-domain`` run on held-out shards); the mixture's domains are read from
    ``{valid_data_prefix}.{domain}`` with the mixture's weights."""

    def __post_init__(self) -> None:
        sources = [n for n, on in (("mock", self.mock), ("blend", self.blend is not None),
                                    ("mixture", self.mixture is not None)) if on]
        if len(sources) != 1:
            raise ValueError(
                f"DataConfig: set exactly one of mock=True, blend=..., mixture=... (got "
                f"{sources or 'none'}); e.g. data.mock=true for a smoke run or "
                "data.blend={'path/to/prefix': 1.0}")
        if self.mixture is not None:
            from .mixtures import MIXTURES

            if self.mixture not in MIXTURES:
                raise ValueError(f"DataConfig.mixture={self.mixture!r} is unknown; choose one of "
                                 f"{sorted(MIXTURES)} or give an explicit blend")
            if not self.data_prefix:
                raise ValueError(f"DataConfig.mixture={self.mixture!r} needs data_prefix (the "
                                 "--output-prefix given to tools/mds_to_indexed.py for the data's root folder)")
        if self.blend is not None:
            self.blend_entries()  # validates
        if self.valid_blend is not None and self.valid_data_prefix is not None:
            raise ValueError("DataConfig: set valid_blend or valid_data_prefix, not both")
        if self.valid_data_prefix is not None and self.mixture is None:
            raise ValueError("DataConfig.valid_data_prefix applies a mixture's domains to held-out data and "
                             "needs mixture=...; with an explicit blend, give valid_blend instead")
        if self.valid_blend is not None:
            self.valid_entries()  # validates
        if self.mock_mean_doc_length is not None and self.mock_mean_doc_length < 2:
            raise ValueError("DataConfig.mock_mean_doc_length must be >= 2 (or None for the default)")
        if self.pad_token_id < 0:
            raise ValueError("DataConfig.pad_token_id must be a valid (non-negative) token id")

    def blend_entries(self) -> list[dict[str, Any]]:
        """The datasets to read as ``[{"prefix": str, "weight": float}]`` (mixture resolved)."""
        if self.mixture is not None:
            from .mixtures import resolve_mixture

            return resolve_mixture(self.mixture, self.data_prefix)
        if self.blend is None:
            return []
        blend = self.blend
        if isinstance(blend, str):
            blend = [blend]
        if isinstance(blend, dict):
            entries = [{"prefix": str(k), "weight": v} for k, v in blend.items()]
        elif isinstance(blend, (list, tuple)):
            entries = []
            for item in blend:
                if isinstance(item, str):
                    entries.append({"prefix": item, "weight": 1.0})
                elif isinstance(item, dict) and ("prefix" in item or "path" in item) \
                        and set(item) <= {"prefix", "path", "weight"}:
                    entries.append({"prefix": str(item.get("prefix", item.get("path"))),
                                    "weight": item.get("weight", 1.0)})
                else:
                    raise ValueError(f"DataConfig.blend entry {item!r}: write it as "
                                     "{'prefix': 'path/to/prefix', 'weight': 0.3} or a plain prefix string")
        else:
            raise ValueError(f"DataConfig.blend must be a dict or a list, got {type(blend).__name__}")
        if not entries:
            raise ValueError("DataConfig.blend is empty; list at least one dataset prefix")
        for e in entries:
            try:
                e["weight"] = float(e["weight"])
            except (TypeError, ValueError):
                raise ValueError(f"DataConfig.blend: weight of {e['prefix']} is not a number: "
                                 f"{e['weight']!r}") from None
            if not e["weight"] > 0:
                raise ValueError(f"DataConfig.blend: weight of {e['prefix']} must be > 0 "
                                 f"(got {e['weight']}); drop the entry instead")
            if e["prefix"].endswith((".bin", ".idx")):
                raise ValueError(f"DataConfig.blend: give {e['prefix']} without .bin/.idx")
        return entries

    def valid_entries(self) -> list[dict[str, Any]]:
        """The validation datasets as ``[{"prefix": str, "weight": float}]``; empty without any."""
        if self.valid_data_prefix is not None:
            from .mixtures import resolve_mixture

            return resolve_mixture(self.mixture, self.valid_data_prefix)
        if self.valid_blend is None:
            return []
        try:  # the same forms as blend, checked by the same code
            return DataConfig(blend=self.valid_blend).blend_entries()
        except ValueError as e:
            raise ValueError(str(e).replace("DataConfig.blend", "DataConfig.valid_blend")) from None
