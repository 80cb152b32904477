"""Run megatron-core on CPU with gloo: every CUDA assumption it makes, redirected in one place.

Active only when ``init_platform`` chose the CPU (no GPU, or asked for). What is redirected:

- ``torch.cuda.current_device()`` and tensors created with ``device="cuda"``/``0`` inside
  megatron-core: a ``TorchFunctionMode`` rewrites the device of factory calls and ``.to()``;
- ``Tensor.cuda()`` moves to that device (a no-op on CPU); ``torch.cuda.synchronize`` /
  ``empty_cache`` / streams / events become no-ops;
- ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names, which the distributed optimizer checks;
- the CUDA RNG tracker is replaced by one that keeps CPU generator states (dropout forks,
  activation recompute).

gloo (torch >= 2.6) has the tensor collectives megatron-core uses, so nothing else is needed.
The dry run (``dry_run.py``) installs the same shims with ``meta`` as the device CUDA becomes.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _redirect(device, target: torch.device):
    """``device`` with CUDA (a name, an index or a torch.device) replaced by ``target``."""
    if device is None:
        return None
    if isinstance(device, int):
        return target
    if isinstance(device, str):
        return target if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return target
    return device


_CUDA_TYPE_NAMES = {
    f"torch.{prefix}{kind}Tensor": f"torch.cuda.{kind}Tensor"
    for prefix in ("", "meta.") for kind in ("Float", "Half", "BFloat16")
}


class _CudaRedirectMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to ``target`` for every torch call made while active."""

    def __init__(self, target: torch.device):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _redirect(kwargs["device"], self.target)
        if kwargs.get("pin_memory"):  # needs a CUDA driver (megatron's get_pos_emb_on_this_cp_rank)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, int, torch.device)):
            args = (args[0], _redirect(args[1], self.target)) + tuple(args[2:])
        if func in (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad):
            return _run_backward_with_mode(self, func, args, kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def _run_backward_with_mode(mode, func, args, kwargs):
    """Run a backward call with the mode active inside it.

    A mode is popped while its handler runs, so ``loss.backward()`` / ``torch.autograd.backward``
    called through the handler would run every autograd ``backward`` (e.g. megatron's
    sequence-parallel ``LinearWithGradAccumulationAndAsyncCommunication``, which allocates with
    ``device=torch.cuda.current_device()``) without the CUDA->CPU rewrite. Re-push the mode and
    call torch.autograd's entry points with their torch-function check skipped (else they would
    dispatch straight back here).
    """
    import torch.autograd as autograd

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        call = dict(zip(names, args[1:]), **kwargs)
        tensor = args[0]
        func = lambda: autograd.backward(  # noqa: E731
            tensor, call.get("gradient"), call.get("retain_graph"), call.get("create_graph", False),
            inputs=call.get("inputs"))
    else:
        target = autograd.backward if func is torch.autograd.backward else autograd.grad
        func = lambda: target(*args, **kwargs)  # noqa: E731
    orig = autograd.has_torch_function
    autograd.has_torch_function = lambda *a, **k: False
    try:
        with mode:
            return func()
    finally:
        autograd.has_torch_function = orig


class CpuRNGStatesTracker:
    """CPU stand-in for megatron's CudaRNGStatesTracker: named CPU generator states to fork into."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} / seed {seed} already added")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def seed_rng_tracker(seed: int) -> None:
    """CPU equivalent of ``model_parallel_cuda_manual_seed``: same names, same seed offsets."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NoEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoEvent(_NoStream):
    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def install(target: str = "cpu") -> None:
    """Install the shims for this process, CUDA becoming ``target``. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    device = torch.device(target)
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.Tensor.cuda = lambda self, *a, **k: self.to(device)

    # Activation recompute saves and restores "the CUDA RNG state": make that the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker = lambda *a, **k: None

    torch.overrides._get_current_function_mode  # noqa: B018 - fail early if torch lacks modes
    _CudaRedirectMode(device).__enter__()
    _INSTALLED = True
