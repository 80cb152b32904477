"""The user's data path end to end: files -> conversion tools -> torchrun training on them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.data._fixtures import random_docs, write_packed_mds
from tests.e2e.test_cli import ROOT, _run
from tests.tool_env import tool_env

pytestmark = pytest.mark.distributed


def _tool(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _steps(stdout: str) -> list[float]:
    return [float(l.split("| loss ")[1].split()[0]) for l in stdout.splitlines() if l.startswith("step ")]


def test_prolong_mds_shards_to_a_blended_length_sorted_run(tmp_path):
    rng = np.random.default_rng(0)
    # Two ProLong domains, packed MDS samples with `indices`, vocab of the debug model.
    write_packed_mds(tmp_path / "mds", {"book-65536": random_docs(rng, 60, 20, 400, vocab=512),
                                        "fineweb-edu": random_docs(rng, 120, 5, 80, vocab=512)})
    _tool("tools/mds_to_indexed.py", "--input", str(tmp_path / "mds"), "--output-prefix",
          str(tmp_path / "idx" / "prolong"), "--split-by-domain", "--vocab-size", "512", "--quiet")
    blend = json.dumps({str(tmp_path / "idx" / "prolong.book-65536"): 0.6,
                        str(tmp_path / "idx" / "prolong.fineweb-edu"): 0.4})
    out = _run(["--config", "examples/tiny_cpu.yaml", "data.mock=false", f"data.blend={blend}",
                "data.length_sorted=true", "train.steps=3", "train.seq_length=64", "checkpoint.save_dir=null",
                "checkpoint.save_interval=0"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = _steps(out.stdout)
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_chat_jsonl_to_an_sft_run_with_the_real_tokenizer(tmp_path):
    chats = tmp_path / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    _tool("tools/make_sft_data.py", "--input", str(chats), "--output-prefix", str(tmp_path / "sft" / "chat"),
          "--quiet")
    out = _run(["--config", "examples/tiny_cpu.yaml", "model.name=llama3-tiny", "data.mock=false",
                f"data.blend=[{tmp_path / 'sft' / 'chat'}]", "data.sft=true", "train.steps=3",
                "train.seq_length=128", "train.global_batch_size=4", "checkpoint.save_dir=null",
                "checkpoint.save_interval=0"], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = _steps(out.stdout)
    # Assistant-only loss over the 128256-token vocabulary starts near ln(128256) = 11.76.
    assert len(losses) == 3 and 10.5 < losses[0] < 12.5
