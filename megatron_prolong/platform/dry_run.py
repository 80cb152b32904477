"""Dry run: this process becomes one rank of a GPU job, on fake tensors, with no GPU.

``install(world_size, rank)``, before anything builds process groups or models, redirects in one
place what a simulated rank needs; nothing here is active in a normal run:

- **Process groups**: torch's fake process group (``FakeStore``) for the whole world, so
  megatron-core builds every TP / PP / CP / DP group of the real job and collectives return at
  once. megatron's gloo groups become fake groups too (gloo would wait for ranks that do not
  exist), and the object collectives it uses to check that ranks agree (``all_gather_object``,
  ``broadcast_object_list``) see every rank hold this rank's object.
- **Device**: the shims of ``cpu.py`` with ``meta`` where megatron-core says CUDA
  (``torch.cuda.current_device()``, ``device="cuda"``, ``.cuda()``, streams, events, the RNG
  tracker), and ``platform.current_device()`` is ``meta``, while the run decides as on a GPU
  (bf16, the CUDA attention kernels, megatron's GPU initialisation). Every tensor of the step is
  a ``FakeTensor`` (``fake_mode()``): shape, dtype and device, no data. A CPU tensor meeting a
  ``meta`` one raises exactly where it would meet a CUDA one on a GPU.

  Why ``meta`` and not fake CUDA tensors: the forward of fake CUDA tensors runs, but autograd's
  engine asks the CUDA runtime about every device it stashes streams for
  (``GraphTask::stash_current_streams`` -> ``hasPrimaryContext``), which fails without a GPU
  ("hasPrimaryContext expects a valid device index"), whatever the autograd threading.
  Registering a PrivateUse1 backend as the accelerator (the other way torch offers to fake a
  device guard) moves the failure to the engine's stream check for every CUDA gradient
  (``opt_ready_stream && opt_parent_stream``). ``meta`` is not an accelerator: the engine runs
  no stream logic, and FakeTensor's device rules (CPU scalars allowed, any other CPU tensor
  refused) are the same for ``meta`` as for ``cuda``.
- **Kernels**: flex_attention accepts ``meta`` inputs and runs its higher-order op directly
  (under FakeTensorMode: its output shapes; ``torch.compile`` is off in a dry run); RMSNorm
  keeps what torch's fused CUDA kernel keeps (its input and an fp32 rstd; the ``meta`` path
  would keep fp32 copies); megatron's
  multi-tensor L2 norm, apex's fused kernel on the GPU image, falls back to a loop that reads
  every norm on the host without apex: a device-side one stands in, so the step has the host
  syncs of the GPU run, not those of the fallback; the coalesced collectives megatron's DDP
  issues get the meta implementations torch gives the other c10d ops.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.distributed as dist

META = torch.device("meta")
_INSTALLED: tuple[int, int] | None = None


def install(world_size: int, rank: int) -> None:
    """Make this process rank ``rank`` of ``world_size`` on fake tensors (see the module doc).
    Once per process: the shims cannot be undone."""
    global _INSTALLED
    if _INSTALLED is not None:
        if _INSTALLED != (world_size, rank):
            raise RuntimeError(f"dry run already installed as rank {_INSTALLED[1]} of {_INSTALLED[0]}")
        return
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    from .. import platform
    from . import cpu

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK="0")
    _fake_process_groups(world_size, rank)
    cpu.install(target="meta")
    _fake_kernels()
    platform._DRY_RUN = True
    _INSTALLED = (world_size, rank)


def fake_mode():
    """The FakeTensorMode the simulated rank runs in, one per process (fake tensors of two modes
    cannot meet, and caches such as the attention's positions outlive a step); real CPU inputs
    (the dataset's samples) become fake tensors when they meet it."""
    global _FAKE_MODE
    if _FAKE_MODE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _FAKE_MODE = FakeTensorMode(allow_non_fake_inputs=True)
    return _FAKE_MODE


_FAKE_MODE = None


@contextlib.contextmanager
def real_tensors():
    """The block runs on real tensors with values: every dispatch mode of the step (the fake
    tensors, the dry run's observers, the FLOP counter) is set aside, and restored after. For the
    host-side batch preparation (``platform.host_side``), which reads values as it does in a real
    run; its results become fake when they are copied to the device."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def _fake_process_groups(world_size: int, rank: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group exists already; a dry run must start its own fake one")
    # ``meta`` named too: pipeline sends ask the group for the backend of the tensors' device.
    dist.init_process_group("cpu:fake,cuda:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world_size)
    new_group = dist.new_group

    def fake_new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = None  # the default: fake
        return new_group(*args, **kwargs)

    def all_gather_object(object_list, obj, group=None):
        object_list[:] = [copy.deepcopy(obj) for _ in object_list]

    dist.new_group = fake_new_group
    dist.all_gather_object = all_gather_object
    dist.broadcast_object_list = lambda object_list, *args, **kwargs: None


def _fake_kernels() -> None:
    import torch._dynamo
    import torch.distributed._meta_registrations as c10d_meta
    import torch.nn.attention.flex_attention as flex
    from megatron.core.optimizer import clip_grads

    torch._dynamo.config.disable = True
    check_device = flex._validate_device

    def validate_device(query, key, value):
        if query.device.type != "meta":
            check_device(query, key, value)

    flex._validate_device = validate_device
    rms_norm = torch.nn.functional.rms_norm

    def fused_rms_norm(input, normalized_shape, weight=None, eps=None):
        if input.device.type != "meta" or weight is None or weight.dtype != input.dtype:
            return rms_norm(input, normalized_shape, weight, eps)  # (torch's own rule for the fused kernel)
        return _FusedRMSNorm.apply(input, weight)

    torch.nn.functional.rms_norm = fused_rms_norm
    flex._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True  # the op itself, not a compiled wrapper
    from ..attention.flex import run_flex_uncompiled

    run_flex_uncompiled()  # (the trainer's compiled flex would find dynamo off and refuse to run)
    clip_grads.l2_norm_impl = _device_l2_norm

    global _C10D_LIB
    _C10D_LIB = torch.library.Library("c10d", "IMPL")
    for op in ("allreduce_coalesced_", "allgather_coalesced_", "allgather_into_tensor_coalesced_",
               "reduce_scatter_tensor_coalesced_"):
        _C10D_LIB.impl(op, lambda *args: c10d_meta.create_fakework(args, return_first_arg=False), "Meta")


_C10D_LIB = None


class _FusedRMSNorm(torch.autograd.Function):
    """What torch's fused CUDA RMSNorm (``aten._fused_rms_norm``, where ``rms_norm`` goes on a GPU
    when input and weight share a dtype) makes and keeps: the output, an fp32 rstd per row, and its
    input for backward. On ``meta`` torch takes the composite path instead, which keeps fp32
    copies of the input the GPU never makes."""

    @staticmethod
    def forward(ctx, input, weight):
        torch._check(input.device == weight.device, lambda: f"rms_norm: input on {input.device}, "
                     f"weight on {weight.device}")
        rstd = torch.empty(input.shape[:-1] + (1,), dtype=torch.float32, device=input.device)
        ctx.save_for_backward(input, weight, rstd)
        return torch.empty_like(input)

    @staticmethod
    def backward(ctx, grad):
        input, weight, _ = ctx.saved_tensors
        return torch.empty_like(input), torch.empty_like(weight)


def _device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract (a one-element fp32 tensor on the device, no host
    sync), from torch ops."""
    if not tensor_lists[0]:
        return torch.zeros(1, device=META), None
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None
