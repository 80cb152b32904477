"""The batch and loss paths as if on CUDA (megatron_prolong/platform/cuda_on_cpu.py): what a
training step hands the model, built from a collated batch moved to the device, at CP 1/2/4 and
TP 1/2, for TE (THD) and the portable kernels; the evaluation micro-batch; the chunked loss head
forward and backward at TP 1/2. Every tensor must come out on the device with the values of the
CPU run, no op may mix devices as CUDA refuses, and the loss head must not wait for the device.
The ``gpu`` tests run the THD batches and the loss head on a real GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_prolong.data.batch import collate
from megatron_prolong.parallel.context_parallel import prepare_batch
from megatron_prolong.platform.cuda_on_cpu import CUDA0, cuda_on_cpu, is_fake_cuda

SEQ = 48
DOCS = ([0, 5, 13, 40, 48], [0, 48], [0, 1, 30, 48])  # a 1-token document, one over the CP chunks
LAYOUTS = [(1, 1, False), (2, 1, False), (4, 1, False), (1, 2, True), (2, 2, True), (4, 2, True)]
"""(CP, TP, sequence parallelism)."""


def _samples():
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(1, 100, SEQ), "labels": rng.integers(1, 100, SEQ),
             "loss_mask": (rng.random(SEQ) > 0.2).astype(np.float32), "cu_seqlens": np.array(cu, dtype=np.int32)}
            for cu in DOCS]


def _host(x):
    """A prepared batch, on the host, with every device tensor checked to be on the device."""
    if isinstance(x, dict):
        return {k: _host(v) for k, v in x.items()}
    if torch.is_tensor(x):
        assert is_fake_cuda(x), f"a {tuple(x.shape)} tensor of the prepared batch is on the host"
        return x.cpu()
    if hasattr(x, "cu_seqlens_q"):  # PackedSeqParams
        return {k: _host(v) for k, v in vars(x).items() if torch.is_tensor(v)}
    return x


def _assert_same(got, want):
    if isinstance(want, dict):
        for k in want:
            _assert_same(got[k], want[k])
    elif torch.is_tensor(want):
        assert torch.equal(got, want)
    elif hasattr(want, "cu_seqlens_q"):
        _assert_same(got, {k: v for k, v in vars(want).items() if torch.is_tensor(v)})
    else:
        assert got == want


@pytest.mark.parametrize("use_te", [True, False], ids=["te_thd", "portable"])
@pytest.mark.parametrize("cp,tp,sp", LAYOUTS)
def test_training_micro_batches_on_the_device(use_te, cp, tp, sp):
    from megatron_prolong.training.data_iter import micro_batches

    samples = _samples()
    split = dict(cp_size=cp, use_te=use_te, tp_size=tp, sequence_parallel=sp)
    for rank in range(cp):
        want = list(micro_batches(samples, [[0, 1], [2]], device=torch.device("cpu"), cp_rank=rank, **split))
        with cuda_on_cpu():
            got = [_host(mb) for mb in micro_batches(samples, [[0, 1], [2]], device=CUDA0, cp_rank=rank, **split)]
        for g, w in zip(got, want):
            _assert_same(g, w)


@pytest.mark.parametrize("use_te", [True, False], ids=["te_thd", "portable"])
@pytest.mark.parametrize("cp,tp,sp", [(2, 1, False), (4, 2, True)])
def test_evaluation_micro_batch_on_the_device(use_te, cp, tp, sp):
    from megatron_prolong.eval.engine import ForwardScorer

    cfg = SimpleNamespace(parallel=SimpleNamespace(context=cp, tensor=tp, sequence_parallel=sp))

    def scorer(device, rank):
        return ForwardScorer([], cfg, SimpleNamespace(cp_rank=rank, use_te=use_te, device=device))

    samples = _samples()
    for rank in range(cp):
        want = scorer(torch.device("cpu"), rank)._micro_batch(samples, [2, 0])
        with cuda_on_cpu():
            got = _host(scorer(CUDA0, rank)._micro_batch(samples, [2, 0]))
        _assert_same(got, want)


def test_collate_then_move_keeps_every_field():
    batch = collate(_samples())
    with cuda_on_cpu() as log:
        moved = {k: v.to(CUDA0, non_blocking=True) for k, v in batch.items()}
    assert all(is_fake_cuda(v) for v in moved.values()) and log.syncs == []
    _assert_same({k: v._inner for k, v in moved.items()}, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("cp,tp,sp", LAYOUTS)
def test_thd_micro_batches_on_cuda(cp, tp, sp):
    """The TE path's batches on a GPU (without TE: the pure-torch partition)."""
    from megatron_prolong.training.data_iter import micro_batches

    split = dict(cp_size=cp, use_te=True, tp_size=tp, sequence_parallel=sp)
    for rank in range(cp):
        want = micro_batches(_samples(), [[0, 1], [2]], device=torch.device("cpu"), cp_rank=rank, **split)
        got = micro_batches(_samples(), [[0, 1], [2]], device=torch.device("cuda"), cp_rank=rank, **split)
        for g, w in zip(got, want):
            assert g["tokens"].is_cuda and g["position_ids"].is_cuda
            _assert_same({k: v.cpu() for k, v in g.items() if torch.is_tensor(v)},
                         {k: v for k, v in w.items() if torch.is_tensor(v)})
