"""The special token ids (bos / eos / pad) and ``generation_config.json`` an exported model gets.

A Hugging Face model stops generating at ``generation_config.eos_token_id``. Llama-3 Instruct
models end an answer with ``<|eot_id|>`` (128009), not ``<|end_of_text|>`` (128001); their
generation config lists both (``[128001, 128009]``; Llama-3.1: ``[128001, 128008, 128009]``). A
chat model exported with eos 128001 alone never stops after its answer.

hf-to-megatron records the source's ids (``config.json``) and its ``generation_config.json`` in
the checkpoint's ``prolong_meta.json`` (``hf_generation``). megatron-to-hf takes them from the
first of:

1. ``--tokenizer DIR`` when DIR has a ``config.json`` or ``generation_config.json`` (the original
   HF model folder);
2. the checkpoint's ancestry: its own ``hf_generation`` (a converted checkpoint; older converted
   checkpoints: the ``hf_config.json`` copy), else the checkpoint its run started from
   (``train_state.config.checkpoint.init_from`` in the trainer's metadata), followed back while
   those folders exist;
3. for the Llama-3 vocabulary (128256 tokens): bos 128000, eos ``[128001, 128009]``, which stops
   both plain text and chat turns.

Then, for the Llama-3 vocabulary, if any run in that ancestry trained with ``data.sft=true`` (the
project's chat format ends every assistant turn with ``<|eot_id|>``), 128009 is made part of eos
in both files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS = 128000  # <|begin_of_text|>
LLAMA3_END_OF_TEXT = 128001  # <|end_of_text|>
LLAMA3_EOT = 128009  # <|eot_id|>: end of a chat turn
LLAMA3_DEFAULT_IDS = {"bos_token_id": LLAMA3_BOS, "eos_token_id": [LLAMA3_END_OF_TEXT, LLAMA3_EOT]}

META_KEY = "hf_generation"
MAX_ANCESTRY = 32  # init_from hops followed (a guard against loops through copied folders)


def default_token_ids(vocab_size: int) -> dict:
    """Ids to use when nothing is known: Llama-3's for its vocabulary, none otherwise."""
    return dict(LLAMA3_DEFAULT_IDS) if vocab_size == LLAMA3_VOCAB_SIZE else {}


def read_hf_generation(hf_dir: Path) -> dict | None:
    """``{"config_token_ids", "generation_config"}`` of an HF folder, or None when it has neither
    ``config.json`` nor ``generation_config.json``."""
    hf_dir = Path(hf_dir)
    cfg_path, gen_path = hf_dir / "config.json", hf_dir / "generation_config.json"
    if not cfg_path.is_file() and not gen_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return {"config_token_ids": {k: cfg[k] for k in TOKEN_ID_KEYS if cfg.get(k) is not None},
            "generation_config": json.loads(gen_path.read_text()) if gen_path.is_file() else None}


@dataclass
class ExportTokenIds:
    config_token_ids: dict
    """bos / eos / pad for ``config.json``."""
    generation_config: dict
    """The whole ``generation_config.json``."""
    source: str
    """Where they came from (for the log)."""


def _stored_generation(meta: dict, ckpt_dir: Path) -> dict | None:
    if meta.get(META_KEY):
        return meta[META_KEY]
    legacy = Path(ckpt_dir) / "hf_config.json"  # converted before hf_generation was recorded
    if legacy.is_file():
        cfg = json.loads(legacy.read_text())
        return {"config_token_ids": {k: cfg[k] for k in TOKEN_ID_KEYS if cfg.get(k) is not None},
                "generation_config": None}
    return None


def _train_config(meta: dict) -> dict:
    return (meta.get("train_state") or {}).get("config") or {}


def checkpoint_ancestry(meta: dict, ckpt_dir: Path) -> Iterator[tuple[dict, Path]]:
    """``(metadata, iteration folder)`` of this checkpoint, then of the checkpoint its run started
    from (``checkpoint.init_from``), and so on while those folders exist."""
    from .layout import CheckpointError, iteration_dir, read_checkpoint_meta

    seen = {Path(ckpt_dir).resolve()}
    yield meta, Path(ckpt_dir)
    for _ in range(MAX_ANCESTRY):
        init_from = (_train_config(meta).get("checkpoint") or {}).get("init_from")
        if not init_from:
            return
        try:
            meta = read_checkpoint_meta(init_from)
            ckpt_dir = iteration_dir(init_from, meta["iteration"])
        except (CheckpointError, OSError, ValueError, KeyError):
            return  # moved or deleted since: the known ancestry ends here
        if ckpt_dir.resolve() in seen:
            return
        seen.add(ckpt_dir.resolve())
        yield meta, ckpt_dir


def _ensure_eot(ids: dict) -> bool:
    """Add <|eot_id|> to ``ids["eos_token_id"]`` (kept an int when it already is that id)."""
    eos = ids.get("eos_token_id")
    eos_list = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    if LLAMA3_EOT in eos_list:
        return False
    ids["eos_token_id"] = eos_list + [LLAMA3_EOT]
    return True


def resolve_export_token_ids(meta: dict, ckpt_dir: Path, vocab_size: int,
                             tokenizer_dir: Path | None = None) -> ExportTokenIds:
    """The ids and generation config megatron-to-hf writes (order of precedence: module doc)."""
    ancestry = list(checkpoint_ancestry(meta, ckpt_dir))
    found, source = None, None
    if tokenizer_dir is not None:
        found, source = read_hf_generation(tokenizer_dir), f"--tokenizer {tokenizer_dir}"
    if found is None:
        for m, d in ancestry:
            found = _stored_generation(m, d)
            if found is not None:
                source = f"recorded in {d}" + ("" if d == Path(ckpt_dir) else " (this run's init_from ancestry)")
                break
    if found is None:
        found = {"config_token_ids": default_token_ids(vocab_size), "generation_config": None}
        source = "Llama-3 defaults" if found["config_token_ids"] else "none known"
    config_ids = dict(found["config_token_ids"])
    generation = dict(found["generation_config"] or {"_from_model_config": True, **config_ids})
    sft = any(bool((_train_config(m).get("data") or {}).get("sft")) for m, _ in ancestry)
    if sft and vocab_size == LLAMA3_VOCAB_SIZE:
        added = [_ensure_eot(d) for d in (config_ids, generation)]
        if any(added):
            source += f"; <|eot_id|> ({LLAMA3_EOT}) added to eos: trained with data.sft=true"
    return ExportTokenIds(config_ids, generation, source)
