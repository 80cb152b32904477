"""Validation during training: reported at the interval and at the end, overall and per dataset,
printed and in TensorBoard; a run with it on trains exactly like one with it off."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data._fixtures import write_indexed
from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

BASE = ["model.name=llama3-debug", "data.mock=true", "train.device=cpu", "train.steps=4", "train.seq_length=32",
        "train.micro_batch_size=1", "train.global_batch_size=4", "optim.lr=3e-3", "optim.warmup_ratio=0.0",
        "logging.interval=100"]


def _train_with_and_without_eval(valid: list[str], tb: str):
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    blend = "{" + ", ".join(f"{p}: {w}" for p, w in zip(valid, (3.0, 1.0))) + "}"
    try:
        off = trainer.train(load_config(None, BASE))
        on = trainer.train(load_config(None, BASE + [f"data.valid_blend={blend}", "eval.interval=3", "eval.samples=8",
                                                     f"logging.tensorboard_dir={tb}"]))
    finally:
        destroy()
    return off, on


def test_validation_is_reported_and_changes_nothing(tmp_path, capfd):
    rng = np.random.default_rng(0)
    valid = [write_indexed(tmp_path / name, [rng.integers(0, 512, n) for n in rng.integers(10, 80, 20)])
             for name in ("books", "code")]
    results = run_distributed(_train_with_and_without_eval, 2, (valid, str(tmp_path / "tb")))  # DP=2
    for off, on in results:
        assert on.losses == off.losses  # bit for bit: same data position, RNG and model state
        assert sorted(on.evaluations) == [3, 4]  # the interval, and the end of training
        for ev in on.evaluations.values():
            assert set(ev.domains) == {"books", "code"} and np.isfinite(ev.loss)
            assert ev.tokens > 0
            assert min(ev.domains.values()) <= ev.loss <= max(ev.domains.values())
        # The same validation samples each time: the loss moves only because training did.
        assert on.evaluations[3].tokens == on.evaluations[4].tokens
    assert results[0][1].evaluations[4].loss == results[1][1].evaluations[4].loss  # every rank agrees
    out = capfd.readouterr().out
    assert "eval step      3 | loss" in out and "books" in out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/loss", "eval/ppl", "eval/loss/books", "eval/loss/code"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 4]
