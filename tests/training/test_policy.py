"""Checkpoint policy and pre-emption settings, without process groups."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from megatron_prolong.config import load_config
from megatron_prolong.training.checkpoint import Checkpointer
from megatron_prolong.training.signals import PreemptionSignal
from megatron_prolong.training.trainer import signal_lead_advice


def _checkpointer(*overrides):
    cfg = load_config(None, ["data.mock=true", "train.global_batch_size=1", "train.steps=10", *overrides])
    return Checkpointer(cfg, SimpleNamespace(spec=None), model=None, optimizer=None, scheduler=None)


def test_save_policy():
    c = _checkpointer("checkpoint.save_dir=/tmp/x", "checkpoint.save_interval=4")
    assert [s for s in range(1, 11) if c.due(s)] == [4, 8, 10]  # interval, and the last step
    assert c.due(5, force=True)
    c = _checkpointer("checkpoint.save_dir=/tmp/x", "checkpoint.save_at_end=false")
    assert [s for s in range(1, 11) if c.due(s)] == []
    c = _checkpointer()  # no save_dir: nothing is ever written, even when forced
    assert not c.due(10, force=True)


def test_disabled_preemption_handler_leaves_signals_alone():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionSignal(enabled=False) as p:
        assert signal.getsignal(signal.SIGTERM) is before
        assert p.any_rank_received(device=None) is False
    with PreemptionSignal(enabled=True):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_lead_covers_a_step_and_a_save():
    # 1.5 x (200 + 100) + 60 = 510 -> rounded up to 30 s: 510
    assert "--signal=B:USR1@510" in signal_lead_advice(200.0, 100.0)
    assert "--signal=B:USR1@90" in signal_lead_advice(1.0, 1.0)  # 63 -> 90
    assert "no step/save time measured" in signal_lead_advice(None, 3.0)
