"""Which portable-attention kernel runs, and whether it can run here (checked at construction)."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from . import ATTENTION_BACKENDS

CUDA_ONLY = ("flex", "varlen", "fa4")
"""Kernels with no CPU training path (flex_attention has no CPU backward; the varlen kernels are
CUDA kernels)."""

LOW_PRECISION_ONLY = ("varlen", "fa4")
"""FlashAttention kernels: bf16 / fp16 inputs only."""


class AttentionBackendUnavailable(RuntimeError):
    """The chosen ``model.attention_backend`` cannot run in this environment."""


def resolve_backend(backend: str, device_type: str, dropout_p: float = 0.0) -> str:
    """The kernel ``backend`` means on ``device_type``: ``auto`` is flex on CUDA and sdpa on CPU,
    or with attention dropout (only SDPA implements it)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    # auto stays flex on CUDA until the kernels are timed on a GPU (benchmarks/bench_attention.py)
    return "flex" if device_type == "cuda" and dropout_p == 0.0 else "sdpa"


def unavailable_reason(backend: str, cuda: Optional[bool]) -> Optional[str]:
    """Why ``backend`` cannot run here (None: it can). ``cuda``: whether the run is on a GPU (the
    run record's decision); None skips that check (packages only)."""
    if backend not in ATTENTION_BACKENDS:
        return f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}"
    if backend in ("auto", "sdpa"):
        return None
    if backend in CUDA_ONLY and cuda is False:
        return (f"model.attention_backend={backend} needs a CUDA GPU (none is used here); on CPU choose "
                "auto or sdpa")
    if backend == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"model.attention_backend=flex needs torch >= 2.5 (flex_attention); this is torch {torch.__version__}"
    if backend == "varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            return (f"model.attention_backend=varlen needs torch >= 2.11 (torch.nn.attention.varlen); this is "
                    f"torch {torch.__version__}. Upgrade torch or choose flex")
        from torch.nn.attention.varlen import varlen_attn

        from .varlen import _accepts

        if not (_accepts(varlen_attn, "scale") and _accepts(varlen_attn, "window_size")):
            return (f"model.attention_backend=varlen needs torch >= 2.11 (varlen_attn with scale= and "
                    f"window_size=); this is torch {torch.__version__}. Upgrade torch or choose flex")
    if backend == "fa4":
        try:
            found = importlib.util.find_spec("flash_attn.cute") is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return ("model.attention_backend=fa4 needs FlashAttention-4: pip install flash-attn-4 (or "
                    "pip install 'megatron-prolong[fa4]'), on a Hopper or Blackwell GPU; or choose flex")
    return None


def check_backend(backend: str, dropout_p: float = 0.0, cuda: Optional[bool] = None) -> None:
    """See ``unavailable_reason``; ``cuda=None`` checks the installed packages only."""
    """Raise ``AttentionBackendUnavailable`` (saying what to install or choose) if ``backend``
    cannot run here or cannot do attention dropout."""
    reason = unavailable_reason(backend, cuda)
    if reason is not None:
        raise AttentionBackendUnavailable(reason)
    if dropout_p > 0.0 and backend in CUDA_ONLY:
        raise AttentionBackendUnavailable(
            f"model.attention_backend={backend} has no attention dropout (got {dropout_p}); set "
            "attention_dropout to 0 (Llama-3 uses 0) or choose sdpa")
