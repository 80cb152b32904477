"""Tokenizing raw text and chat data with the real Llama-3 tokenizer (offline), SFT masks, demo data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_prolong.data.indexed import TokenStore
from megatron_prolong.data.tokenize import TextTokenizer, llama3_tokenizer_dir
from megatron_prolong.tools import make_demo_data, make_sft_data, tokenize_to_indexed
from tests.data._fixtures import outputs_like


REPO = Path(__file__).resolve().parents[2]

TEXTS = ["The quick brown fox jumps over the lazy dog.", "", "def f(x):\n    return x + 1\n",
         "Special-looking text <|eot_id|> stays text.", "Ünïcödé and emoji 🎉 " * 20]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(llama3_tokenizer_dir())


def _docs(prefix):
    s = TokenStore(prefix)
    return [np.array(s.doc(d)) for d in range(len(s))]


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_and_text_files(tmp_path, tok, workers):
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "id": k}) + "\n" for k, t in enumerate(TEXTS)))
    txt = tmp_path / "b.txt"
    txt.write_text("A whole plain-text file is one document.\nSecond line.")
    out = tmp_path / "o" / "tok"
    assert tokenize_to_indexed.main(["--input", str(jl), str(txt), "--output-prefix", str(out),
                                     "--append-eos", "--workers", str(workers), "--batch-size", "2",
                                     "--quiet"]) == 0
    docs = _docs(out)
    expected = [t for t in TEXTS if t] + [txt.read_text()]
    assert len(docs) == len(expected)  # the empty text is skipped
    for d, text in zip(docs, expected):
        assert d[-1] == tok.eos_id == 128001
        assert tok.decode(d[:-1]) == text  # exact round trip, <|eot_id|> in raw text is plain text
        assert 128009 not in d
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["documents"] == len(expected) and summary["skipped_empty"] == 1


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i} of some sample text for a tiny model" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   minloglevel=2)
    src = tmp_path / "in.txt"
    src.write_text("some sample text")
    out = tmp_path / "sp_out"
    assert tokenize_to_indexed.main(["--input", str(src), "--output-prefix", str(out), "--tokenizer",
                                     str(tmp_path / "sp.model"), "--vocab-size", "40", "--quiet"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    np.testing.assert_array_equal(_docs(out)[0], sp.encode("some sample text"))


def test_tokenizer_and_input_errors(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    bad_tok = tmp_path / "tokenizer.json"
    bad_tok.write_text("{ this is not a tokenizer")
    out = tmp_path / "o"
    cases = [
        (["--tokenizer", str(bad_tok)], "tokenizer.json"),
        (["--tokenizer", str(tmp_path / "missing.json")], "missing.json"),
        (["--tokenizer", str(llama3_tokenizer_dir() / "tokenizer.model")], "tiktoken"),
        (["--text-key", "body"], "body"),
        (["--vocab-size", "1000"], "outside the vocabulary"),
    ]
    for extra, needle in cases:
        assert tokenize_to_indexed.main(["--input", str(src), "--output-prefix", str(out), "--quiet",
                                         *extra]) == 1
        assert needle in capsys.readouterr().err
        assert outputs_like(out) == []
    src.write_text('{"text": "ok"}\n{broken\n')
    assert tokenize_to_indexed.main(["--input", str(src), "--output-prefix", str(out), "--quiet"]) == 1
    assert f"{src}:2" in capsys.readouterr().err and outputs_like(out) == []


CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "It is 4."},
                  {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": " 6, of course!\n"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello there. Ünïcödé 🎉 and\n\ncode:\n```py\nx = 1\n```"}]},
]


def test_sft_masks_match_assistant_spans(tmp_path, tok):
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    out = tmp_path / "o" / "uc"
    assert make_sft_data.main(["--input", str(src), "--output-prefix", str(out), "--quiet",
                               "--workers", "2"]) == 0
    docs, masks = _docs(out), _docs(f"{out}_mask")
    assert [len(d) for d in docs] == [len(m) for m in masks]  # aligned document by document
    for chat, ids, mask in zip(CHATS, docs, masks):
        msgs = chat["messages"]
        text = tok.decode(ids)
        # The Llama-3 instruct format, content trimmed as the official template does.
        expected_text = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in msgs)
        assert text == expected_text
        # Masked tokens decode to exactly the assistant contents, each followed by <|eot_id|>.
        answers = [m["content"].strip() + "<|eot_id|>" for m in msgs if m["role"] == "assistant"]
        assert tok.decode(ids[mask == 1]) == "".join(answers)
        # ... and each contiguous masked run is one assistant turn.
        runs = np.split(np.arange(len(mask)), np.flatnonzero(np.diff(mask)) + 1)
        on = [tok.decode(ids[r]) for r in runs if mask[r[0]]]
        assert on == answers


def test_sft_bad_conversation(tmp_path, capsys):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "o"
    assert make_sft_data.main(["--input", str(src), "--output-prefix", str(out), "--quiet"]) == 1
    assert "no assistant message" in capsys.readouterr().err and outputs_like(out) == []
    src.write_text(json.dumps({"conversation": []}) + "\n")
    assert make_sft_data.main(["--input", str(src), "--output-prefix", str(out), "--quiet"]) == 1
    assert "messages" in capsys.readouterr().err and outputs_like(out) == []


def test_make_demo_data(tmp_path, capsys):
    assert make_demo_data.main(["--output-dir", str(tmp_path), "--max-mb", "0.2"]) == 0
    assert "stdlib_text" in capsys.readouterr().out
    docs = _docs(tmp_path / "stdlib_text")
    assert len(docs) > 5 and sum(map(len, docs)) > 10_000
    assert max(int(d.max()) for d in docs) < 128256
