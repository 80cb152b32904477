"""What a dry-run step does, seen from the dispatcher: memory by category, collectives by group,
GEMMs by dtype, and the host syncs it would make.

``StepObserver`` is a ``TorchDispatchMode`` entered inside the dry run's ``FakeTensorMode``, so it
sees every op of the simulated rank with fake (shape, dtype, device) tensors:

- **memory**: every storage an op creates is counted from its birth to its release (a weak
  reference's finalizer), under the category of when it was made: ``weights``, ``grads`` and
  ``optimizer`` while the model and the optimizer are built (sorted by what holds them),
  ``activations`` in forward, ``loss head`` inside the output layer + cross-entropy (forward and
  its chunked backward), ``recompute`` (a layer's forward re-run in backward) and ``backward``
  (gradients) in backward, ``optimizer step`` in the optimizer step (Adam's moments are born
  there). The peak of the live total is kept with its breakdown, and so are the peaks while the
  model and optimizer are built, while the loss head runs and while the layers run backward
  (the planner's two activation-side maxima).
- **collectives**: each c10d op with the megatron group it runs on (TP, CP, DP, PP, ...) and the
  bytes of its whole buffer (the gathered tensor of an all-gather, the input of a
  reduce-scatter); an all-gather or reduce-scatter whose sizes do not match its group raises.
- **GEMMs**: operands of different dtypes raise (CUDA refuses them; fake kernels do not check),
  and so does an fp32 GEMM in a bf16 run (``DtypeError``): every GEMM of the step should take
  bf16 operands, fp32 accumulation being the kernel's business.
- **host syncs**: reading a device value on the host (``.item()``, ``bool(t)``, ``float(t)``)
  has no answer on fake tensors; it returns 0 / False ("nothing wrong": no overflow, no skipped
  step), and where it happened is recorded. Ops whose output shape depends on values
  (``nonzero``, boolean indexing) fail, with where they were called.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

GEMMS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
         aten.baddbmm.default: (1, 2), aten.addmm.out: (1, 2), aten.mm.out: (0, 1), aten.bmm.out: (0, 1),
         aten.addmm_.default: (1, 2), aten.baddbmm_.default: (1, 2), aten.addmm.dtype_out: (1, 2)}
"""GEMM overloads -> positions of their two matrix operands."""

ACCUMULATING_GEMM = aten.addmm.dtype_out
"""bf16 x bf16 added into an fp32 output in place (cuBLAS beta=1; ``cross_entropy.accumulate_matmul``
on CUDA). It has no fake kernel: torch's decomposition would make an fp32 product the GPU never
allocates, so the observer answers it as the kernel does (the output, unchanged in size)."""

IN_PLACE_GEMMS = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}
"""In-place GEMMs and the op whose FLOP formula they share (FlopCounterMode has none for them)."""

DEVICE_QUERY = torch.ops.prim.device.default
SCALAR_READS = (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default)

STEP_CATEGORIES = ("activations", "loss head", "recompute", "backward")
"""What forward and backward make (the optimizer step's survivors are Adam's moments)."""


class DryRunError(RuntimeError):
    """The simulated step did something that would fail or misbehave on the GPU."""


class DtypeError(DryRunError):
    """A GEMM with mixed operand dtypes, or in fp32 in a bf16 run."""


_HERE = os.path.dirname(__file__)
_CPU_SHIMS = os.path.join(os.path.dirname(_HERE), "platform", "cpu.py")


def call_site() -> str:
    """``file:line (function)`` of the innermost caller outside torch, this module and the
    standard library: the project's or megatron-core's code that issued the op."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("/torch/" in name or name.startswith(_HERE) or "/contextlib.py" in name or name == _CPU_SHIMS):
            short = name.split("site-packages/")[-1]
            if "megatron_prolong/" in short:
                short = "megatron_prolong/" + short.split("megatron_prolong/")[-1]
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


@dataclass
class Collective:
    calls: int = 0
    bytes: int = 0


@dataclass
class Peak:
    total: int = 0
    by_category: dict = field(default_factory=dict)
    seq: int = 0
    """How many storages had been made by then (``StepObserver.buffers_at``)."""

    def offer(self, total: int, live: dict, seq: int) -> None:
        if total > self.total:
            self.total, self.by_category, self.seq = total, dict(live), seq


class StepObserver(TorchDispatchMode):
    """See the module doc. ``phase`` is set by the driver ("weights" while the model is built,
    "optimizer" while the optimizer is, "step" for the training step)."""

    supports_higher_order_operators = True

    def __init__(self, *, bf16: bool, flop_counter=None):
        super().__init__()
        self.bf16 = bf16
        self.flop_counter = flop_counter
        """A ``FlopCounterMode`` below this mode, for the GEMMs answered here."""
        self.phase = "weights"
        self.in_loss_head = 0
        self.in_layer_forward = 0
        self.live: dict[str, int] = defaultdict(int)
        self._storages: dict[int, list] = {}  # storage id -> [bytes, category, birth number]
        self._born = 0
        self.peak = Peak()
        self.peak_build = Peak()
        self.peak_loss_head = Peak()
        self.peak_layer_backward = Peak()
        self.collectives: dict[tuple[str, str], Collective] = defaultdict(Collective)
        self.gemm_flops: Counter = Counter()
        self.host_syncs: Counter = Counter()
        self.group_names: dict[str, str] = {}

    # ------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE_QUERY and isinstance(args[0], FakeTensor):
            return args[0].fake_device  # (half the calls; answered here, the modes below are slow)
        kwargs = kwargs or {}
        if func in SCALAR_READS and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            self.host_syncs[call_site()] += 1
            return False if func is aten.is_nonzero.default or args[0].dtype == torch.bool else \
                (0.0 if args[0].is_floating_point() else 0)
        if func in GEMMS:
            self._gemm(func, args, kwargs)
            if func is ACCUMULATING_GEMM:
                if self.flop_counter is not None:
                    self.flop_counter._count_flops(aten.addmm, kwargs["out"], args[:3], {})
                return kwargs["out"]
        elif getattr(func, "namespace", None) == "c10d":
            self._collective(func, args)
        try:
            out = func(*args, **kwargs)
        except DryRunError:
            raise
        except Exception as e:
            if not getattr(e, "_dry_run_site", False):
                e.add_note(f"dry run: {func} called at {call_site()}")
                e._dry_run_site = True
            raise
        self._track(out)
        return out

    # ------------------------------------------------------------------ memory

    def category(self) -> str:
        if self.phase != "step":
            return self.phase
        if self.in_loss_head:
            return "loss head"
        if torch._C._current_graph_task_id() != -1:  # autograd's engine is running: backward
            return "recompute" if self.in_layer_forward else "backward"
        return "activations"

    def _track(self, out) -> None:
        cat = None
        for t in _tensors(out):
            if t.is_sparse or not hasattr(t, "untyped_storage"):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._storages:
                continue
            cat = cat or self.category()
            self.add_storage(st, cat)

    def add_storage(self, st, category: str) -> None:
        key = st._cdata
        nbytes = st.nbytes()
        self._born += 1
        self._storages[key] = [nbytes, category, self._born]
        self.live[category] += nbytes
        weakref.finalize(st, self._release, key)
        self._offer_peaks()

    def _release(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live[entry[1]] -= entry[0]

    def recategorise(self, tensors, category: str) -> None:
        """Count the storages of ``tensors`` under ``category`` (e.g. DDP's gradient buffers,
        made while the model was built)."""
        for t in tensors:
            entry = self._storages.get(t.untyped_storage()._cdata)
            if entry is not None and entry[1] != category:
                self.live[entry[1]] -= entry[0]
                self.live[category] += entry[0]
                entry[1] = category

    def _offer_peaks(self) -> None:
        total = sum(self.live.values())
        self.peak.offer(total, self.live, self._born)
        if self.phase in ("weights", "optimizer"):
            self.peak_build.offer(total, self.live, self._born)
        elif self.phase == "step":
            if self.in_loss_head:
                self.peak_loss_head.offer(total, self.live, self._born)
            elif torch._C._current_graph_task_id() != -1:
                self.peak_layer_backward.offer(total, self.live, self._born)

    def buffers_at(self, peak: Peak) -> dict:
        """Bytes by category, alive at ``peak``, of what the step made and never released: buffers
        and caches (megatron's sequence-parallel all-gather buffer, attention layout caches),
        not activations. Call after the step."""
        kept = defaultdict(int)
        for nbytes, category, born in self._storages.values():
            if born <= peak.seq and category in STEP_CATEGORIES:
                kept[category] += nbytes
        return dict(kept)

    @contextlib.contextmanager
    def loss_head(self):
        self.in_loss_head += 1
        try:
            yield
        finally:
            self.in_loss_head -= 1

    def watch_layers(self, layers) -> list:
        """Forward hooks on the transformer layers: a layer's forward inside backward is its
        activation recompute. Returns the hook handles."""
        def enter(*_):
            if torch._C._current_graph_task_id() != -1:
                self.in_layer_forward += 1

        def leave(*_):
            if torch._C._current_graph_task_id() != -1:
                self.in_layer_forward -= 1

        handles = []
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(enter))
            handles.append(layer.register_forward_hook(leave))
        return handles

    # ------------------------------------------------------------------ GEMMs

    def _gemm(self, func, args, kwargs) -> None:
        from torch.utils.flop_counter import mm_flop

        i, j = GEMMS[func]
        a, b = args[i], args[j]
        if a.dtype != b.dtype:
            raise DtypeError(f"GEMM {func} with operands of different dtypes {a.dtype} and {b.dtype} "
                             f"(CUDA refuses it) at {call_site()}")
        if self.bf16 and a.dtype == torch.float32:
            raise DtypeError(f"fp32 GEMM {tuple(a.shape)} x {tuple(b.shape)} in a bf16 run at {call_site()}: "
                             "every GEMM of the step should take bf16 operands (fp32 accumulation is the "
                             "kernel's business); cast the operands, or fix what made them fp32")
        batch = a.shape[0] if a.dim() == 3 else 1
        self.gemm_flops[str(a.dtype).replace("torch.", "")] += batch * mm_flop(a.shape[-2:], b.shape[-2:])

    # ------------------------------------------------------------------ collectives

    def name_groups(self, named: dict) -> None:
        """``{name: process group}``: the first name of each group (by its c10d name) wins."""
        for name, group in named.items():
            if group is not None:
                self.group_names.setdefault(group.group_name, name)

    def _collective(self, func, args) -> None:
        from torch._C._distributed_c10d import ProcessGroup

        group, lists = None, []
        for a in args:
            if isinstance(a, torch.ScriptObject) and group is None:
                try:
                    group = ProcessGroup.unbox(a)
                except RuntimeError:
                    pass
            elif isinstance(a, torch.Tensor):
                lists.append([a])
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                lists.append(list(a))
        if group is None or not lists:
            return
        sizes = [sum(t.numel() * t.element_size() for t in ts) for ts in lists]
        op = func.__name__.split(".")[0].strip("_")
        if len(lists) == 2 and ("allgather" in op or "reduce_scatter" in op) and "coalesced" not in op:
            small, big = sorted(sizes)
            if small * group.size() != big:
                raise DryRunError(f"{op} on a group of {group.size()} ranks with buffers of {sizes[0]} and "
                                  f"{sizes[1]} bytes at {call_site()} (NCCL would fail or hang)")
        name = self.group_names.get(group.group_name, f"group of {group.size()}")
        entry = self.collectives[(name, op)]
        entry.calls += 1
        entry.bytes += max(sizes)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)


def megatron_groups() -> dict:
    """megatron-core's process groups by the names the report uses (first name wins for groups
    that coincide)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def get(fn, **kw):
        try:
            return fn(**kw)
        except (AssertionError, RuntimeError):
            return None

    return {
        "TP": get(ps.get_tensor_model_parallel_group),
        "CP": get(ps.get_context_parallel_group),
        "DP": get(ps.get_data_parallel_group),
        "DPxCP": get(ps.get_data_parallel_group, with_context_parallel=True),
        "PP": get(ps.get_pipeline_model_parallel_group),
        "TPxCP": get(ps.get_tensor_and_context_parallel_group),
        "MP": get(ps.get_model_parallel_group),
        "OPT": get(ps.get_intra_distributed_optimizer_instance_group),  # the gradient norm's group
        "embedding": get(ps.get_embedding_group),
        "world": dist.group.WORLD,
    }

