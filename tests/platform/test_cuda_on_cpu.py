"""The fake-CUDA net (megatron_prolong/platform/cuda_on_cpu.py): CPU tensors reporting cuda:0
that refuse what CUDA refuses and count what makes the host wait, with real values."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_prolong.platform.cuda_on_cpu import CUDA0, DeviceMixError, cuda_on_cpu, is_fake_cuda


def test_device_tensors_report_cuda_and_compute_real_values():
    with cuda_on_cpu():
        x = torch.arange(6, device="cuda", dtype=torch.float32)
        y = torch.ones(6).to("cuda") * 2 + x
        assert is_fake_cuda(y) and y.device == CUDA0 and y.is_cuda
        assert is_fake_cuda(torch.zeros(2, device=0)) and is_fake_cuda(torch.empty_like(x))
        assert y.cpu().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0] and y.cpu().device.type == "cpu"
        w = torch.randn(3, requires_grad=True)  # a host leaf, moved to the device and back
        (w.to("cuda") * 3).cpu().sum().backward()
        assert w.grad.tolist() == [3.0, 3.0, 3.0]
        leaf = torch.ones(2, device="cuda", requires_grad=True)
        (leaf * leaf).sum().backward()
        assert is_fake_cuda(leaf.grad) and leaf.grad.cpu().tolist() == [2.0, 2.0]


def test_mixing_is_refused_where_cuda_refuses_it():
    with cuda_on_cpu():
        x = torch.zeros(4, dtype=torch.long, device="cuda")
        index = torch.tensor([0, 2])
        for bad in (lambda: x + torch.ones(4, dtype=torch.long), lambda: torch.cat([x, torch.zeros(2).long()]),
                    lambda: x.index_select(0, index),
                    lambda: x.__setitem__(index.to("cuda"), torch.tensor([5, 6]))):  # issue 16's THD crash
            with pytest.raises(DeviceMixError, match="cuda:0 and cpu"):
                bad()
        # what CUDA allows: CPU scalars, CPU indices, copies, 0-dim values written by index
        x[index] = torch.tensor(7)
        x[2:] = torch.tensor([1, 2])
        y = x + torch.tensor(1)
        assert (y[index]).cpu().tolist() == [8, 2] and x.cpu().tolist() == [7, 0, 1, 2]
        with pytest.raises(DeviceMixError, match="NCCL"):
            dist.all_reduce(torch.ones(2))


def test_host_syncs_are_counted():
    with cuda_on_cpu() as log:
        x = torch.tensor([0, 3, 0, 5], device="cuda")
        x.sum() * 2, x.cumsum(0), torch.where(x > 0, x, 0)  # noqa: B018 - none of these waits
        assert log.syncs == []
        x.sum().item(), x.tolist(), bool(x.any()), x.nonzero(), x[x > 0]  # noqa: B018
        torch.repeat_interleave(x), torch.repeat_interleave(x, x, output_size=8)  # noqa: B018
        pinned = torch.empty(4, dtype=x.dtype, pin_memory=True)
        pinned[:].copy_(x, non_blocking=True)  # no wait into pinned memory
        assert pinned.is_pinned() and not torch.empty(4).is_pinned()
        torch.empty(4, dtype=x.dtype).copy_(x)
        torch.cuda.synchronize()
        assert len(log.syncs) == 8, log.syncs
        assert log.device_allocations == [32]
