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
import torch.distributed as dist

from megatron_prolong.data.batch import collate
from megatron_prolong.parallel import cross_entropy
from megatron_prolong.parallel.cross_entropy import chunked_lm_loss, masked_loss_sum
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
        with cuda_on_cpu() as log:
            on_device = list(micro_batches(samples, [[0, 1], [2]], device=CUDA0, cp_rank=rank, **split))
            # prepared on the host, then copied from pinned memory: the GPU's queue is never waited on
            assert log.syncs == [], log.syncs
            got = [_host(mb) for mb in on_device]
        for g, w in zip(got, want):
            _assert_same(g, w)


@pytest.mark.parametrize("use_te", [True, False], ids=["te_thd", "portable"])
@pytest.mark.parametrize("cp,tp,sp", LAYOUTS)
def test_prepare_batch_of_a_batch_on_the_device(use_te, cp, tp, sp):
    """prepare_batch itself on device tensors (the trainer calls it on the host): every output on the
    device, equal to the host's, nothing mixing devices (THD's position_ids once did)."""
    from megatron_prolong.parallel.context_parallel import prepare_batch

    batch = collate(_samples())
    split = dict(cp_size=cp, use_te=use_te, tp_size=tp, sequence_parallel=sp)
    for rank in range(cp):
        want = prepare_batch(batch, cp_rank=rank, **split)
        with cuda_on_cpu():
            got = _host(prepare_batch({k: v.to(CUDA0) for k, v in batch.items()}, cp_rank=rank, **split))
        _assert_same(got, want)


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
        with cuda_on_cpu() as log:
            on_device = scorer(CUDA0, rank)._micro_batch(samples, [2, 0])
            assert log.syncs == [], log.syncs
            got = _host(on_device)
        _assert_same(got, want)


def test_collate_then_move_keeps_every_field():
    batch = collate(_samples())
    with cuda_on_cpu() as log:
        moved = {k: v.to(CUDA0, non_blocking=True) for k, v in batch.items()}
    assert all(is_fake_cuda(v) for v in moved.values()) and log.syncs == []
    _assert_same({k: v._inner for k, v in moved.items()}, batch)


def _loss_inputs(device, dtype=torch.float32, s=37, b=2, h=8, v=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).to(device).requires_grad_()
    labels = torch.randint(0, 2 * v, (b, s), generator=g).to(device)  # half outside a TP-1 vocab: TP 2's other shard
    mask = (torch.rand(b, s, generator=g) > 0.3).float().to(device)
    return hidden, weight, labels, mask


def _loss_and_grads(device, **kwargs):
    hidden, weight, labels, mask = _loss_inputs(device)
    labels = labels % weight.shape[0]
    losses = chunked_lm_loss(hidden, weight, labels, chunk_tokens=10, **kwargs)
    total, count = masked_loss_sum(losses, mask)
    total.backward()
    return losses, total, count, hidden.grad, weight.grad


@pytest.fixture
def no_addmm_probe(monkeypatch):
    """The one-off (cached) probe of a fused bf16 -> fp32 GEMM is a sync of its own, made once per
    process on CUDA; answered here so the counts are the loss head's."""
    monkeypatch.setattr(cross_entropy, "_OUT_DTYPE_ADDMM", {CUDA0: False})


def test_chunked_loss_head_forward_backward_on_the_device_without_syncs(no_addmm_probe):
    want = _loss_and_grads("cpu")
    with cuda_on_cpu() as log:
        got = _loss_and_grads("cuda")
        assert all(is_fake_cuda(t) for t in got), [t.device for t in got]
        got = [t.cpu() for t in got]
        assert log.syncs == ["copy to host memory"] * len(got), log.syncs  # only the test's own copies
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.fixture
def fake_tp2():
    """A 2-rank process group whose collectives do nothing (torch's fake backend): TP 2's code
    paths with one process; the values are not those of TP 2."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_chunked_loss_head_tp2_on_the_device_without_syncs(no_addmm_probe, fake_tp2, sequence_parallel):
    with cuda_on_cpu() as log:
        hidden, weight, labels, mask = _loss_inputs("cuda", s=36)
        if sequence_parallel:  # this rank's half of the sequence
            hidden = hidden.detach()[:18].requires_grad_()
        weight.main_grad = torch.zeros(weight.shape, device="cuda")  # megatron DDP's fp32 buffer
        weight.grad_added_to_main_grad = False
        losses = chunked_lm_loss(hidden, weight, labels, chunk_tokens=10, tp_group=fake_tp2,
                                 sequence_parallel=sequence_parallel)
        total, _ = masked_loss_sum(losses, mask)
        total.backward()
        assert all(is_fake_cuda(t) for t in (losses, hidden.grad, weight.main_grad))
        assert weight.grad_added_to_main_grad and log.syncs == [], log.syncs


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


@pytest.mark.gpu
def test_chunked_loss_head_makes_no_host_sync_on_cuda():
    hidden, weight, labels, mask = _loss_inputs("cuda", dtype=torch.bfloat16, s=4096, h=64, v=1000)
    cross_entropy._out_dtype_addmm_works(hidden.device)  # the one-off probe (cached), before counting
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = masked_loss_sum(chunked_lm_loss(hidden, weight, labels % 1000, chunk_tokens=512), mask)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(hidden.grad.float()).all()
