"""``tools/evaluate.py`` as users run it: a plain process and torchrun; files, summary, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import free_port, run_distributed
from tests.tool_env import tool_env

from ._helpers import write_initial_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _evaluate(args, nproc=0, timeout=600):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                 "--master-port", str(free_port())] if nproc else [sys.executable])
    env = tool_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return subprocess.run(launcher + ["tools/evaluate.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for model, seq in (("llama3-tiny", 256), ("llama3-debug", 64)):
        out[model] = str(root / model)
        run_distributed(write_initial_checkpoint, 1,
                        (out[model], [f"model.name={model}", f"train.seq_length={seq}"]))
    return out


def _assert_png(path: Path):
    import matplotlib.image

    assert path.stat().st_size > 5000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.05  # not blank


@pytest.mark.distributed
def test_plain_process_with_defaults_passkey_in_text(checkpoints, tmp_path):
    out = _evaluate(["--checkpoint", checkpoints["llama3-tiny"], "--output", tmp_path, "--ppl-documents", 2,
                     "--samples-per-cell", 1])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["trained_length"] == 256 and results["layout"] == "TP 1 PP 1 CP 1 DP 1"
    ppl = results["perplexity_by_position"]
    assert ppl["length"] == 256 and ppl["tokens"] == 2 * 256 and len(ppl["buckets"]) == 9
    assert "standard library" in ppl["source"]  # the built-in text: no data given, no demo corpus needed
    assert ppl["whole_documents"]  # two source files of at least 257 tokens
    ret = results["retrieval"]
    assert ret["task"] == "passkey" and ret["lengths"] == [64, 128, 256] and ret["cases"] == 15
    assert len(ret["cells"]) == 15 and "choice_accuracy" not in ret["cells"][0]
    _assert_png(tmp_path / "ppl_by_position.png")
    _assert_png(tmp_path / "retrieval_heatmap.png")
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.strip() in out.stdout and "perplexity by position" in summary and "passkey" in summary


@pytest.mark.distributed
def test_torchrun_context_parallel(checkpoints, tmp_path):
    out = _evaluate(["--checkpoint", checkpoints["llama3-debug"], "--output", tmp_path, "--cp", 2,
                     "--ppl-documents", 2, "--samples-per-cell", 2], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["layout"] == "TP 1 PP 1 CP 2 DP 1"
    assert results["retrieval"]["task"] == "kv" and results["retrieval"]["chance"] == pytest.approx(1 / 16)
    assert out.stdout.count("perplexity by position") == 1  # one rank reports


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/ckpt"], "checkpoint directory /no/such/ckpt does not exist"),
    (["--lengths", "128"], "exceed the context"),
    (["--ppl-length", "128"], "--allow-extrapolation"),
    (["--lengths", "62", "--cp", "2"], "multiple of 2 x parallel.context = 4"),
    (["--cp", "2"], "torchrun --nproc-per-node 2"),
    (["--data", "/no/such/prefix"], "/no/such/prefix.bin does not exist"),
    (["--depths", "0.5,2"], "depths must lie in [0, 1]"),
])
def test_bad_arguments_fail_fast_with_a_clear_message(tmp_path, args, message):
    if "--checkpoint" not in args:
        args = ["--checkpoint", _metadata_only_checkpoint(tmp_path / "ckpt", seq_length=64)] + args
    out = _evaluate(args + ["--output", tmp_path / "out"], timeout=120)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


def _metadata_only_checkpoint(root: Path, seq_length=None) -> str:
    """What evaluate.py reads before loading weights: the folder layout and metadata."""
    from megatron_prolong.checkpoint_layout import write_checkpoint_meta

    folder = root / "iter_0000000"
    folder.mkdir(parents=True)
    spec = {"name": "hf-model", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
            "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 512, "max_position_embeddings": 8192}
    train_state = {"config": {"train": {"seq_length": seq_length}}} if seq_length else {}
    write_checkpoint_meta(folder, {"iteration": 0, "model_spec": spec, "has_optimizer": False,
                                   "train_state": train_state})
    (folder / "metadata.json").write_text("{}")  # megatron's own marker of a complete folder
    (root / "latest_checkpointed_iteration.txt").write_text("0\n")
    return str(root)


def test_model_only_checkpoint_without_a_recorded_length(tmp_path):
    """A converted Hugging Face model records no training run: its max_position_embeddings is the
    trained context."""
    from megatron_prolong.eval.runner import build_parser, check_request

    ckpt = _metadata_only_checkpoint(tmp_path)
    req = check_request(build_parser().parse_args(["--checkpoint", ckpt, "--output", str(tmp_path / "o")]))
    assert req.trained_length == 8192 and req.lengths == [512, 1024, 2048, 4096, 8192]
