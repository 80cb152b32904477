"""Exported models get the eos ids that make them stop: the source's (recorded at conversion,
found again through a training run's init_from), Llama-3's [128001, 128009] by default, and
<|eot_id|> always after SFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megatron_prolong.convert import hf_to_megatron, megatron_to_hf

from ._helpers import make_hf_model, read_json


def _quiet(_msg: str) -> None:
    pass


def _fake_trained_checkpoint(converted: Path, out: Path, *, sft: bool, iteration: int = 5) -> Path:
    """What the trainer leaves after a run with ``checkpoint.init_from=converted``: the same weights
    under its own metadata (no conversion records; the run's config in train_state)."""
    src_iter = converted / "iter_0000000"
    dst_iter = out / f"iter_{iteration:07d}"
    shutil.copytree(src_iter, dst_iter)
    (dst_iter / "hf_config.json").unlink()
    meta = read_json(dst_iter / "prolong_meta.json")
    for key in ("converted_from", "hf_generation", "dtype"):
        meta.pop(key, None)
    meta.update(iteration=iteration, train_state={
        "iteration": iteration, "consumed_samples": 40,
        "config": {"data": {"sft": sft}, "checkpoint": {"init_from": str(converted), "save_dir": str(out)}}})
    (dst_iter / "prolong_meta.json").write_text(json.dumps(meta))
    (out / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return out


def test_source_ids_and_generation_config_survive_conversion_and_training(tmp_path):
    src = make_hf_model(tmp_path / "hf")
    # An Instruct-style source: config eos = end of turn, generation stops at either.
    cfg = read_json(src / "config.json")
    cfg.update(bos_token_id=1, eos_token_id=3)
    (src / "config.json").write_text(json.dumps(cfg))
    gen = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (src / "generation_config.json").write_text(json.dumps(gen))

    hf_to_megatron(src, tmp_path / "meg", log=_quiet)
    run = _fake_trained_checkpoint(tmp_path / "meg", tmp_path / "run", sft=False)
    for ckpt, out in ((tmp_path / "meg", tmp_path / "out_converted"), (run, tmp_path / "out_trained")):
        megatron_to_hf(ckpt, out, log=_quiet)
        assert read_json(out / "config.json")["eos_token_id"] == 3, ckpt
        assert read_json(out / "config.json")["bos_token_id"] == 1, ckpt
        assert read_json(out / "generation_config.json") == gen, ckpt

    # --tokenizer (the original folder) still takes precedence.
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer_config.json").write_text("{}")
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    megatron_to_hf(run, tmp_path / "out_tok", tokenizer_dir=other, log=_quiet)
    assert read_json(tmp_path / "out_tok" / "generation_config.json") == {"eos_token_id": 7}


def test_llama3_sft_export_stops_at_eot(tmp_path):
    """A Llama-3-vocabulary model converted from a base-style source (eos 128001 only), then
    trained with data.sft=true: the export's eos holds <|eot_id|> in both files."""
    src = make_hf_model(tmp_path / "hf", vocab_size=128256, dtype=torch.bfloat16, max_shard_size="10GB",
                        bos_token_id=128000, eos_token_id=128001)
    (src / "generation_config.json").unlink(missing_ok=True)
    hf_to_megatron(src, tmp_path / "meg", log=_quiet)
    run = _fake_trained_checkpoint(tmp_path / "meg", tmp_path / "run", sft=True)
    megatron_to_hf(run, tmp_path / "out", log=_quiet)
    assert read_json(tmp_path / "out" / "config.json")["eos_token_id"] == [128001, 128009]
    gen = read_json(tmp_path / "out" / "generation_config.json")
    assert gen["eos_token_id"] == [128001, 128009] and gen["bos_token_id"] == 128000


def test_llama3_defaults_when_nothing_is_recorded(tmp_path):
    """No --tokenizer, no recorded source (a run from scratch, or its init_from folder is gone)."""
    from megatron_prolong.convert.token_ids import resolve_export_token_ids

    meta = {"iteration": 3, "train_state": {"config": {"checkpoint": {"init_from": str(tmp_path / "gone")},
                                                       "data": {"sft": False}}}}
    ids = resolve_export_token_ids(meta, tmp_path, 128256)
    assert ids.config_token_ids == {"bos_token_id": 128000, "eos_token_id": [128001, 128009]}
    assert ids.generation_config["eos_token_id"] == [128001, 128009]
    # Another vocabulary: nothing is invented.
    assert resolve_export_token_ids(meta, tmp_path, 512).config_token_ids == {}
