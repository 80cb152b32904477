"""What counts as a checkpoint: only complete ones; broken pointers fail with the path in the message."""

from __future__ import annotations

import json

import pytest

from megatron_prolong.training.checkpoint import (LATEST_FILE, META_FILE, CheckpointError, iteration_dir,
                                                   latest_iteration, read_checkpoint_meta)


def _complete(root, iteration):
    d = iteration_dir(root, iteration)
    d.mkdir(parents=True)
    (d / META_FILE).write_text(json.dumps({"iteration": iteration, "model_spec": {}, "has_optimizer": True}))


def test_no_checkpoint_yet(tmp_path):
    assert latest_iteration(tmp_path) is None
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        read_checkpoint_meta(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_meta(tmp_path / "nope")


def test_partial_save_is_never_the_latest(tmp_path):
    _complete(tmp_path, 10)
    (tmp_path / LATEST_FILE).write_text("10\n")
    # A save of step 20 that died half-way: its directory exists under the partial name only.
    (tmp_path / ".iter_0000020.partial").mkdir()
    assert latest_iteration(tmp_path) == 10
    assert read_checkpoint_meta(tmp_path)["iteration"] == 10


def test_pointer_to_incomplete_checkpoint_is_an_error(tmp_path):
    iteration_dir(tmp_path, 30).mkdir()  # no meta: never completed
    (tmp_path / LATEST_FILE).write_text("30")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        latest_iteration(tmp_path)
    (tmp_path / LATEST_FILE).write_text("garbage")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        latest_iteration(tmp_path)


def test_dp_reshardable_state_refuses_a_layout_change(tmp_path, monkeypatch):
    from megatron_prolong.training import checkpoint as ckpt

    d = iteration_dir(tmp_path, 5)
    d.mkdir(parents=True)
    (d / META_FILE).write_text(json.dumps({
        "iteration": 5, "model_spec": {}, "has_optimizer": True, "optimizer_format": "dp_reshardable",
        "parallel": {"tensor": 2, "pipeline": 1, "context": 1, "data": 4}}))
    (tmp_path / LATEST_FILE).write_text("5")
    monkeypatch.setattr(ckpt, "_model_parallel_layout", lambda: {"tensor": 1, "pipeline": 1, "context": 1})
    with pytest.raises(CheckpointError, match="resumes only at the same TP/PP/CP"):
        ckpt.load_checkpoint(tmp_path, [object()], optimizer=object())
