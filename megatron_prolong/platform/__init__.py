"""Device backend: CUDA + NCCL when a GPU is there, otherwise CPU + gloo.

``init_platform`` must run before megatron-core builds models or process groups. On CUDA it
only picks the device; on CPU it installs the shims of ``cpu.py`` that let megatron-core run
unmodified. Nothing here changes the CUDA path. A dry run (``dry_run.install``) makes this
process one rank of a GPU job on fake tensors: the run decides as on CUDA, the tensors live on
``meta`` and the process group is torch's fake one.

This package is the only place that asks torch whether CUDA exists or which optional GPU
packages import; the run record (``training/run.py``) turns the answers into decisions once.
It imports torch only inside its functions, so the tools can quiet library notices
(``quiet_known_warnings``) before torch and megatron-core load.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE: str | None = None
_DRY_RUN = False
"""Set by ``dry_run.install``: a simulated GPU rank (fake tensors on ``meta``, fake process group)."""


class PlatformError(RuntimeError):
    """The machine cannot do what was asked (no GPU for device=cuda, ...)."""


def cuda_available() -> bool:
    import torch

    return _DRY_RUN or torch.cuda.is_available()


def te_version() -> tuple[int, int] | None:
    """(major, minor) of an importable Transformer Engine, else None (also in a dry run: TE's
    kernels cannot run on fake tensors, so it simulates the portable path)."""
    if _DRY_RUN:
        return None
    try:
        import transformer_engine
    except ImportError:
        return None
    import re

    m = re.match(r"(\d+)\.(\d+)", getattr(transformer_engine, "__version__", ""))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def fused_wgrad_available() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda``: megatron's own linears (the output layer) need it
    for ``gradient_accumulation_fusion``; megatron checks the same import."""
    from megatron.core.tensor_parallel import layers

    return not _DRY_RUN and bool(getattr(layers, "_grad_accum_fusion_available", False))


def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"`` for a ``train.device`` value, without initialising anything."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise PlatformError("train.device=cuda was asked for but torch sees no GPU; use train.device=cpu "
                            "(or auto), or check CUDA_VISIBLE_DEVICES and the driver")
    return device


def init_platform(device: str = "auto") -> str:
    """Select ``"cuda"`` or ``"cpu"`` (``"auto"``: CUDA when available). Idempotent."""
    import torch

    global _DEVICE
    device = resolve_device(device)
    if _DEVICE is not None:
        if _DEVICE != device:
            raise RuntimeError(f"platform already initialised for {_DEVICE}, cannot switch to {device}")
        return _DEVICE
    if device == "cuda":
        if not _DRY_RUN:  # (the dry run's shims are in place already)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        from . import cpu

        cpu.install()
    _DEVICE = device
    return device


def current_device() -> torch.device:
    """The torch device tensors of this rank live on (``meta`` in a dry run)."""
    import torch

    if _DEVICE is None:
        raise RuntimeError("call megatron_prolong.platform.init_platform() first")
    if _DRY_RUN:
        return torch.device("meta")
    return torch.device("cuda", torch.cuda.current_device()) if _DEVICE == "cuda" else torch.device("cpu")


def is_cpu() -> bool:
    return _DEVICE == "cpu"


def is_cuda() -> bool:
    return _DEVICE == "cuda" and not _DRY_RUN


def synchronize(device: torch.device) -> None:
    """Block the host until the work queued on ``device`` is done (nothing to wait for on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_side():
    """Context for the batch work done on the host with real values (document boundaries, the CP
    split, THD packing): nothing to do in a real run; in a dry run, where every tensor of the step
    is fake, it steps out of the fake tensors for the block."""
    if _DRY_RUN:
        from .dry_run import real_tensors

        return real_tensors()
    import contextlib

    return contextlib.nullcontext()


def dist_backend() -> str:
    if _DRY_RUN:
        return "fake"
    return "nccl" if _DEVICE == "cuda" else "gloo"


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and megatron's tensor-parallel RNG tracker, on either device."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if is_cuda():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from . import cpu

        cpu.seed_rng_tracker(seed)


def rng_states() -> dict:
    """Every generator a training step draws from: torch's CPU one, CUDA's (on CUDA), and
    megatron's model-parallel tracker (dropout, recompute)."""
    import torch
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if is_cuda() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_states(state: dict) -> None:
    """Inverse of ``rng_states``."""
    import torch
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and is_cuda():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch.utils.cpp_extension's "No CUDA runtime is found" (printed at import on every
    machine without a GPU; it concerns building C++ extensions, which nothing here does). Its other
    records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME_NOTICE = _NoCudaRuntimeNotice()


def quiet_known_warnings() -> None:
    """Silence the notices megatron-core and torch print (on every rank, at import) about things
    this project handles on purpose: absent apex/TE (the run record decides TE and prints what
    runs), torch's C++-extension CUDA_HOME guess on a machine without a GPU, deprecated torch
    internals megatron-core calls. Each is matched by its message; everything else still shows.
    Light (imports neither torch nor megatron-core): call it before they load, as every tool's
    entry (``megatron_prolong/tools/__init__.py``) and ``pretrain_prolong.py`` do."""
    import warnings

    for message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"Please use DTensor instead", r"`load_state_dict` is deprecated",
                    r"full scope is deprecated", r"torch.distributed.*_coalescing_manager",
                    r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME_NOTICE)
