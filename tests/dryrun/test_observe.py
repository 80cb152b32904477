"""The dry run's dispatcher-level observer on small fake tensors (no process group, no model)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_prolong.dryrun.observe import DtypeError, StepObserver

MiB = 2 ** 20


def _meta(*shape, dtype=torch.bfloat16, **kw):
    return torch.empty(*shape, dtype=dtype, device="meta", **kw)


def test_gemm_with_mixed_dtypes_fails_like_cuda():
    with FakeTensorMode(), StepObserver(bf16=False):
        a, b = _meta(4, 8), _meta(8, 2, dtype=torch.float32)
        with pytest.raises(DtypeError, match="different dtypes"):
            a @ b


def test_fp32_gemm_in_a_bf16_run_fails_and_bf16_ones_are_counted():
    obs = StepObserver(bf16=True)
    with FakeTensorMode(), obs:
        _meta(64, 32) @ _meta(32, 16)
        torch.bmm(_meta(3, 64, 32), _meta(3, 32, 16))
        with pytest.raises(DtypeError, match="fp32 GEMM .* in a bf16 run at .*test_observe.py"):
            _meta(64, 32, dtype=torch.float32) @ _meta(32, 16, dtype=torch.float32)
    assert obs.gemm_flops == {"bfloat16": 2 * 64 * 32 * 16 * 4}


def test_host_reads_answer_zero_and_say_where():
    obs = StepObserver(bf16=True)
    with FakeTensorMode(), obs:
        x = _meta(4, dtype=torch.float32)
        assert float(x.sum()) == 0.0
        assert not bool(x.sum() > 1)
    assert len(obs.host_syncs) == 2
    assert all("test_observe.py" in site and "test_host_reads" in site and n == 1 for site, n in obs.host_syncs.items())


def test_memory_by_category_from_birth_to_release():
    obs = StepObserver(bf16=True)
    with FakeTensorMode(), obs:
        w = torch.nn.Parameter(_meta(256, 1024))  # made while building: weights
        obs.phase = "step"
        x = _meta(1024, 256, requires_grad=True)
        y = torch.tanh(x @ w)  # the GEMM's output is freed: tanh keeps only its own output for backward
        assert obs.live["activations"] == (x.numel() + y.numel()) * 2
        with obs.loss_head():
            loss = (y * 2).float().sum()
        assert obs.live["loss head"] > 0
        loss.backward()
        peak = dict(obs.peak.by_category)
        del y, loss
        assert obs.live["activations"] == x.numel() * 2 and obs.live["loss head"] == 0
    assert obs.live["weights"] == w.numel() * 2
    assert obs.live["backward"] == (x.grad.numel() + w.grad.numel()) * 2  # the gradients, made in backward
    assert peak["activations"] == (x.numel() + 1024 * 1024) * 2 and peak["loss head"] > 0  # (peak: in the loss head)
