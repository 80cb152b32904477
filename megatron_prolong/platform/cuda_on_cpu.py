"""CUDA on the CPU, for tests: tensors that compute on the CPU but say they are on ``cuda:0``.

A CPU-only CI runs the CUDA-only paths (TE's THD packing, the owners' checkpoint staging, ...)
on CPU tensors, where a CPU tensor written into a "device" buffer is no error; on CUDA it is.
``FakeTensorMode`` catches such mixes but has no values, so it cannot run data-dependent code
(batch preparation reads document lengths). Inside ``with cuda_on_cpu() as fake:``

- ``torch`` factories given a CUDA device (``"cuda"``, ``"cuda:0"``, ``0``, ``x.device`` of a
  fake tensor), ``.to("cuda")`` / ``.to(fake)`` and ``.cuda()`` make a :class:`CudaOnCpuTensor`:
  a CPU tensor underneath (real values), whose ``device`` is ``cuda:0``. Ops on fake tensors
  make fake tensors; ``.cpu()`` / ``.to("cpu")`` copy back (autograd flows through both);
- an aten op that mixes a fake tensor with a CPU tensor that is not 0-dim raises
  :class:`DeviceMixError`, with the exceptions CUDA makes: copies, and CPU index tensors for
  indexing (the values written by ``index_put_`` must be on the device or 0-dim);
- ``torch.distributed`` calls through the ``torch.distributed`` module refuse CPU tensors, as
  NCCL does (collectives on fake tensors run on the CPU tensors underneath, e.g. with gloo or
  the fake process group);
- what makes the host wait for a CUDA device is counted in ``fake.syncs`` (``.item()``,
  ``.tolist()``, ``bool()``, ``nonzero``, boolean-mask indexing, ``repeat_interleave`` without
  ``output_size``, copies to non-pinned host memory, ``torch.cuda.synchronize``);
- ``pin_memory=True`` is remembered (``is_pinned()``), device factories are logged in
  ``fake.device_allocations`` (bytes), and ``torch.cuda.current_device()`` answers 0.

Not modelled: kernels, streams, memory limits, CUDA-only dtypes or kernels (the CPU's are used).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA0 = torch.device("cuda", 0)
_CPU = torch.device("cpu")


class DeviceMixError(RuntimeError):
    """An op mixed device tensors with host tensors in a way CUDA refuses."""


@dataclass
class FakeCudaLog:
    """What happened inside one ``cuda_on_cpu()`` block."""

    syncs: list[str] = field(default_factory=list)
    """One entry per host-device synchronisation CUDA would do, naming the op."""
    device_allocations: list[int] = field(default_factory=list)
    """Bytes of every device tensor made by a factory call (``torch.empty(..., device="cuda")``)."""


_LOG: Optional[FakeCudaLog] = None
_PINNED: set[int] = set()
"""Storage addresses of host tensors made with ``pin_memory=True`` (their views are pinned too)."""


def _pin(t: torch.Tensor) -> None:
    ptr = t.untyped_storage().data_ptr()
    _PINNED.add(ptr)
    weakref.finalize(t, _PINNED.discard, ptr)


def _is_pinned(t: torch.Tensor) -> bool:
    return not isinstance(t, CudaOnCpuTensor) and t.untyped_storage().data_ptr() in _PINNED


def _record_sync(what: str) -> None:
    if _LOG is not None:
        _LOG.syncs.append(what)


class CudaOnCpuTensor(torch.Tensor):
    """A CPU tensor (``_inner``) that reports ``cuda:0`` (see the module doc)."""

    _inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        if isinstance(inner, CudaOnCpuTensor):
            raise TypeError("already a CudaOnCpuTensor")
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=_CPU, requires_grad=False)
        out._inner = inner
        return out

    @property
    def device(self) -> torch.device:
        return CUDA0

    @property
    def is_cuda(self) -> bool:
        return True

    def get_device(self) -> int:
        return 0

    def __repr__(self, **kwargs) -> str:
        return f"CudaOnCpuTensor({self._inner!r}, reports cuda:0)"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _check_devices(func, args, kwargs)
        _count_sync(func, args, kwargs)
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default:
            return out
        # In-place and out= ops return the tensor they wrote: hand back the caller's object.
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor) and _unwrap(args[0]) is out:
            return args[0]
        return tree_map(_wrap, out)


def _unwrap(x):
    return x._inner if isinstance(x, CudaOnCpuTensor) else x


def _wrap(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, CudaOnCpuTensor) and x.device.type == "cpu":
        return CudaOnCpuTensor(x)
    return x


def is_fake_cuda(x) -> bool:
    return isinstance(x, CudaOnCpuTensor)


def _host_tensors(values) -> list[torch.Tensor]:
    return [t for t in values if isinstance(t, torch.Tensor) and not isinstance(t, CudaOnCpuTensor)]


_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten.copy.default, torch.ops.aten._to_copy.default,
           torch.ops.aten.lift_fresh.default}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default, torch.ops.aten._unsafe_index.Tensor}


def _check_devices(func, args, kwargs) -> None:
    if func in _COPIES:
        return
    if func in _INDEXING:
        # CUDA moves CPU indices to the device; the values written must be there (or 0-dim).
        checked = [args[0]] + ([args[2]] if len(args) > 2 else [])
    else:
        checked = tree_flatten((args, kwargs))[0]
    bad = [t for t in _host_tensors(checked) if t.dim() > 0]
    if bad:
        shapes = ", ".join(str(tuple(t.shape)) for t in bad[:3])
        raise DeviceMixError(f"Expected all tensors to be on the same device, but found at least two devices, "
                             f"cuda:0 and cpu! ({func}: CPU tensor(s) of shape {shapes} next to CUDA tensors)")


_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
             torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
             torch.ops.aten.unique_consecutive.default, torch.ops.aten.bincount.default}


def _count_sync(func, args, kwargs) -> None:
    if func in _SYNC_OPS:
        _record_sync(str(func))
    elif func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        _record_sync(f"{func} without output_size")
    elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                  torch.ops.aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else []
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            _record_sync(f"{func} with a boolean mask")
    elif func is torch.ops.aten.copy_.default:
        dst, src = args[0], args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if not isinstance(dst, CudaOnCpuTensor) and isinstance(src, CudaOnCpuTensor) and not (
                non_blocking and _is_pinned(dst)):
            _record_sync("copy to host memory")


class _ToDevice(torch.autograd.Function):
    """A copy onto the fake device (autograd: the gradient comes back to the host)."""

    @staticmethod
    def forward(ctx, x):
        return CudaOnCpuTensor(x.detach().clone())

    @staticmethod
    def backward(ctx, grad):
        return _unwrap(grad).clone()


class _ToHost(torch.autograd.Function):
    """A copy from the fake device to the host (autograd: the gradient goes back)."""

    @staticmethod
    def forward(ctx, x):
        return x._inner.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return CudaOnCpuTensor(grad.detach().clone())


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare index means a CUDA device in torch
    return torch.device(device).type == "cuda"


def _to_target(args, kwargs):
    """(device, dtype, non_blocking) of a ``Tensor.to`` call; device None: unchanged."""
    rest = args[1:]
    if rest and isinstance(rest[0], torch.Tensor):
        other = rest[0]
        return other.device, other.dtype, bool(rest[1] if len(rest) > 1 else kwargs.get("non_blocking", False))
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
    return device, dtype, non_blocking


class _CudaOnCpuMode(TorchFunctionMode):
    """Turns CUDA factories and moves into fake tensors (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from .cpu import _run_backward_with_mode

        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad):
            return _run_backward_with_mode(self, func, args, kwargs)
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if func is torch.Tensor.cuda:
            return _move(args[0], CUDA0, None)
        if func is torch.Tensor.cpu:
            return _move(args[0], _CPU, None)
        if func is torch.Tensor.numpy and is_fake_cuda(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first.")
        if func is torch.Tensor.tolist and is_fake_cuda(args[0]):
            _record_sync("tolist")
            return args[0]._inner.tolist()
        if func is torch.Tensor.is_pinned:
            return _is_pinned(args[0])
        if func is torch.Tensor.pin_memory:
            _pin(args[0])
            return args[0]
        pinned = bool(kwargs.get("pin_memory"))
        if pinned:
            kwargs["pin_memory"] = False  # real pinning needs a CUDA driver
        on_device = _is_cuda_device(kwargs.get("device"))
        if on_device:
            kwargs["device"] = _CPU
        out = func(*args, **kwargs)
        if on_device and isinstance(out, torch.Tensor) and not is_fake_cuda(out):
            if _LOG is not None:
                _LOG.device_allocations.append(out.numel() * out.element_size())
            fake = CudaOnCpuTensor(out.detach())
            return fake.requires_grad_() if out.requires_grad else fake
        if pinned and isinstance(out, torch.Tensor):
            _pin(out)
        return out

    def _to(self, args, kwargs):
        device, dtype, non_blocking = _to_target(args, kwargs)
        x = args[0]
        if device is None:
            return x.to(dtype) if dtype is not None else x
        return _move(x, torch.device(device) if not isinstance(device, int) else CUDA0, dtype, non_blocking)


def _move(x: torch.Tensor, device: torch.device, dtype, non_blocking: bool = False) -> torch.Tensor:
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
    if device.type == "cuda":
        return x if is_fake_cuda(x) else _ToDevice.apply(x)
    if device.type == "cpu" and is_fake_cuda(x):
        if not non_blocking:
            _record_sync("copy to host memory")
        return _ToHost.apply(x)
    return x.to(device)


_NCCL_CALLS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all_single", "send", "recv", "reduce", "batch_isend_irecv")
"""Checked when called through ``torch.distributed``; ``isend`` / ``irecv`` are checked in
``batch_isend_irecv`` (``P2POp`` accepts torch's own functions only)."""


def _nccl_like(name: str, original):
    def call(*args, **kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name == "batch_isend_irecv":
            tensors = [op.tensor for op in args[0]]
        host = _host_tensors(tensors)
        if host:
            raise DeviceMixError(f"torch.distributed.{name}: NCCL takes CUDA tensors only, got a CPU tensor of "
                                 f"shape {tuple(host[0].shape)}")
        return original(*args, **kwargs)

    return call


@contextlib.contextmanager
def cuda_on_cpu():
    """Run the block as if on a CUDA device (module doc); yields the :class:`FakeCudaLog`."""
    import torch.distributed as dist

    global _LOG
    if _LOG is not None:
        raise RuntimeError("cuda_on_cpu() blocks do not nest")
    log = FakeCudaLog()
    saved = {"current_device": torch.cuda.current_device, "synchronize": torch.cuda.synchronize}
    saved_dist = {name: getattr(dist, name) for name in _NCCL_CALLS if hasattr(dist, name)}
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: _record_sync("torch.cuda.synchronize")
    for name, fn in saved_dist.items():
        setattr(dist, name, _nccl_like(name, fn))
    _LOG = log
    try:
        with _CudaOnCpuMode():
            yield log
    finally:
        _LOG = None
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        for name, fn in saved_dist.items():
            setattr(dist, name, fn)
