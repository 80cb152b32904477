"""Fault-tolerance bookkeeping without process groups: bad-step streaks, loss spikes, deferred
saves, the fault-injection grammar, config checks, and the checkpoint integrity checks on a
hand-made DCP folder."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_prolong.config import ConfigError, load_config
from megatron_prolong.errors import TrainingStopped
from megatron_prolong.training import faults
from megatron_prolong.training.checkpoint import Checkpointer
from megatron_prolong.training.guard import StepGuard


def _out(loss, skipped=False, reason=None):
    return SimpleNamespace(loss=loss, skipped=skipped, skip_reason=reason)


def test_streak_counts_consecutive_skips_and_names_them_when_it_stops():
    g = StepGuard(max_bad_steps=3, global_batch_size=8)
    g.record(1, _out(5.0), consumed_before=0)
    g.record(2, _out(math.nan, True, "non-finite loss (nan)"), consumed_before=8)
    assert not g.exhausted and g.consecutive_skipped == 1
    g.record(3, _out(4.9), consumed_before=16)  # an applied step ends the streak
    assert g.consecutive_skipped == 0
    for step in (4, 5, 6):
        g.record(step, _out(math.nan, True, "non-finite gradient norm (inf)"), consumed_before=8 * (step - 1))
    assert g.exhausted
    error = g.stop_error(latest=2)
    assert isinstance(error, TrainingStopped)
    text = str(error)
    assert "training stopped at step 6" in text and "steps 4-6" in text and "non-finite gradient norm" in text
    assert "latest checkpoint is still iteration 2" in text and "samples 24-47" in text


def test_streak_carried_over_a_resume():
    g = StepGuard(max_bad_steps=3, global_batch_size=1, consecutive_skipped=2)
    assert not g.exhausted  # nothing skipped in this run yet
    g.record(7, _out(math.nan, True, "x"), consumed_before=6)
    assert g.exhausted


def test_loss_spike_is_reported_against_the_running_median():
    logged, scalars = [], []
    log = SimpleNamespace(info=logged.append, scalar=lambda name, v, step: scalars.append((name, step, v)))
    g = StepGuard(max_bad_steps=3, global_batch_size=1, log=log, spike_factor=2.0, spike_window=10)
    for step, loss in enumerate([3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1], start=1):
        g.record(step, _out(loss), consumed_before=step - 1)
    g.record(11, _out(5.0), consumed_before=10)  # below 2 x median 2.55
    assert not scalars
    g.record(12, _out(6.0), consumed_before=11)
    assert scalars == [("train/loss_spike", 12, pytest.approx(6.0 / 2.55))]  # 5.0 entered the window
    assert any(m.startswith("loss spike at step 12") for m in logged)


def test_periodic_save_at_a_skipped_step_is_deferred_to_the_next_applied_step():
    cfg = load_config(None, ["data.mock=true", "train.global_batch_size=1", "train.steps=10",
                             "checkpoint.save_dir=/tmp/never-written", "checkpoint.save_interval=4"])
    logged = []
    c = Checkpointer(cfg, SimpleNamespace(spec=None), model=None, optimizer=None, scheduler=None, log=logged.append)
    assert c.maybe_save(4, consumed_samples=4, skipped=True) is None
    assert "checkpoint of step 4 deferred" in logged[0]
    assert c.due(5)  # deferred: due at any step until an applied one saves
    assert c.maybe_save(5, consumed_samples=5, skipped=True) is None  # still in the streak
    assert len(logged) == 1
    assert c.due(6)  # the first applied step after the streak saves


def test_fault_grammar():
    assert faults.parse("nan@3:1, slow_save@4=2.5,hang@2") == [
        faults.Fault("nan", 3, 1, 3600.0), faults.Fault("slow_save", 4, None, 2.5), faults.Fault("hang", 2, None, 3600.0)]
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        faults.parse("boom@3")
    with pytest.raises(ValueError, match="KIND@STEP"):
        faults.parse("nan3")


def test_faults_are_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    batches = iter([{"a": 1}])
    assert faults.inject(3, batches) is batches
    monkeypatch.setenv(faults.ENV, "nan@3")
    assert [b["inject_nan_loss"] for b in faults.inject(3, iter([{}, {}]))] == [True, True]
    assert faults.inject(4, batches) is batches


@pytest.mark.parametrize("override, message", [
    ("train.max_bad_steps=0", "train.max_bad_steps must be >= 1"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be 0 (off) or > 1"),
    ("train.collective_timeout_minutes=0", "train.collective_timeout_minutes must be > 0"),
])
def test_bad_fault_tolerance_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["data.mock=true", "train.global_batch_size=1", override])


def test_fractional_timeout_is_accepted():
    cfg = load_config(None, ["data.mock=true", "train.global_batch_size=1", "train.collective_timeout_minutes=0.25"])
    assert cfg.train.collective_timeout_minutes == 0.25


# ---------------------------------------------------------------- integrity checks on a DCP folder

def _dcp_folder(path):
    """A torch_dist-like folder: DCP records + the two megatron files, written by DCP itself."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)},
             checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({}, path / "common.pt")
    return path


def test_integrity_of_a_good_folder(tmp_path):
    from megatron_prolong.training import checkpoint_integrity as integrity

    folder = _dcp_folder(tmp_path / "ck")
    assert integrity.storage_problems(folder) == []
    report = integrity.verify(folder)
    assert report.ok and report.tensors == 2 and report.chunks_read == 2


def test_integrity_names_truncated_missing_and_non_finite_files(tmp_path):
    from megatron_prolong.training import checkpoint_integrity as integrity

    folder = _dcp_folder(tmp_path / "ck")
    data = next(folder.glob("*.distcp"))
    index = integrity.read_index(folder)
    record = next(info for idx, info in index.storage_data.items() if idx.fqn == "w")
    raw = bytearray(data.read_bytes())
    # 0xff.. is a NaN in float32: overwrite the last value of "w" (the tensor bytes precede the
    # record's trailing zip entries; find them by the known values).
    at = raw.find(torch.tensor([5.0]).numpy().tobytes(), record.offset, record.offset + record.length)
    raw[at:at + 4] = b"\xff\xff\xff\xff"
    data.write_bytes(bytes(raw))
    assert integrity.storage_problems(folder) == []  # the structure is intact
    report = integrity.verify(folder)
    assert not report.ok and report.bad_files == {str(data)}
    assert "w at offset (0, 0): 1 of 6 values are not finite" in report.problems[0]

    data.write_bytes(bytes(raw[: len(raw) // 2]))
    assert any(p.startswith(f"{data}: truncated") for p in integrity.storage_problems(folder))
    data.unlink()
    assert any(p.startswith(f"{data}: missing") for p in integrity.storage_problems(folder))


def test_non_finite_check_is_exact():
    """The cheap sum test flags overflowing finite values too; those are confirmed, not reported."""
    from megatron_prolong.training.checkpoint import non_finite_tensors

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(10))
            self.huge = torch.nn.Parameter(torch.full((4,), 3e38))  # finite, but the sum overflows
            self.c = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))

    w = Weights()
    assert non_finite_tensors([w]) == []
    with torch.no_grad():
        w.a[3], w.c[1] = float("nan"), float("-inf")
    assert non_finite_tensors([w]) == ["a", "c"]
