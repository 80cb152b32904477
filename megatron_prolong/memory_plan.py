"""Per-GPU memory model for long-context Llama-3 training, and a layout search.

Formulas (documented with their derivation in docs/long_context.md; all per GPU, bytes):

- parameters on the heaviest pipeline stage: ``P = ceil(L/pp) * P_layer / tp + V*h/tp * (1 or 2
  stages holding embedding/output) + norms``
- weights ``w_bytes * P`` (bf16: 2); main grads ``g_bytes * P`` (megatron DDP fp32 buffers: 4);
  distributed optimizer ``12 * P / (dp * cp)`` (fp32 master + Adam m + v, sharded over DP x CP)
- activations per token per layer (``T = micro_batch * S / cp`` local tokens), in elements, counted
  from what megatron's local layer + PortableCoreAttention actually save for backward (measured
  with ``saved_tensors_hooks``, see tests/attention/test_memory_plan.py):

    norm part   ``4h + 4`` (fused)           (two RMSNorms: input, fp32 rstd; the linear inputs)
                ``6h + 2`` (composite)       (+ the normalised copy, rstd in the activations' dtype)
                                             divided by tp only with sequence parallelism. Fused:
                                             torch's CUDA RMSNorm and TE's; composite: torch's on CPU
    TP part     ``5h + 3*kv + 4*f + heads``  (q, k, v(+qkv out), attention out, lse, proj input,
                                             fc1 out, SwiGLU, fc2 input), divided by tp
    gathered KV ``2*kv*cp / tp`` per local token when cp > 1 (K, V of the whole sequence)
    SDPA mask   ``S_global`` (float mask, sdpa backend only; 0 for flex_attention / TE)

  ``selective`` (core_attn) recompute drops attention out + lse + mask; ``full`` recompute keeps
  only each layer's input (``h``, /tp with SP) plus one layer's activations while recomputing.
- 1F1B pipeline: the first stage keeps ``min(pp, num_microbatches)`` micro-batches in flight, i.e.
  about ``L`` layers' worth of activations whatever ``pp`` is.
- sequence parallelism's all-gather buffer: megatron's linears gather their input into one
  persistent buffer (its global memory buffer), ``T * h * a`` for the whole run (TP > 1 with SP).
- loss head (``logits``), peak on the last stage beyond the layers' saved activations. What it keeps
  from forward: the final norm's input (``h``, /tp with SP; a composite norm also its normalised
  copy) and the output layer's input - the whole sequence (``h``, gathered over TP with
  SP) for the chunked loss, megatron's shard (``h``, /tp with SP) for its own output layer - both
  released before the layers run backward. Then unchunked
  ``T * V/tp * (a_bytes + 4 + 4)`` (output-layer logits, fp32 copy, exp kept for backward); chunked
  (parallel/cross_entropy.py, whose backward is the peak):
  ``16 T`` (lse + loss kept from forward to backward, the int64 labels in token order)
  ``+ T * h * a`` (d hidden of the gathered sequence; its reduce-scattered shard comes after the
  chunk loop, once the gathered input is released)
  ``+ max(N * (V/tp * (4 + a) + h * a), V/tp * h * w_bytes)``: one chunk's fp32 buffer
  (logits turned in place into softmax and d logits) plus the chunk in the weights' dtype (the GEMM
  output, then d logits; the same tensor when that dtype is fp32, so ``+ a`` only for a < 4) and
  its d hidden, or, after the chunk loop, the dummy weight gradient handed to autograd while the
  real one went into ``main_grad`` (megatron DDP).
- layer backward (``backward``): what one layer's backward allocates on top of that layer's
  activations (recomputed ones under full recompute), per local token, ``a`` bytes per element.
  Autograd frees a node's saved tensors once the node has run, so the gradients partly replace
  activations:
  ``2h/(tp with SP)`` (gradient of the layer's output and of its input in the residual stream)
  ``+ max(2f/tp, A - 4f/tp, 0)``: in the MLP's backward d fc1-output (``2f/tp``) and d fc2-input
  (``f/tp``) minus the freed fc2 input (``f/tp``); in the attention's backward
  ``A = (2h + 2kv)/tp + 2kv*cp/tp`` (d attention-out, dQ, dK/dV of this rank's shard and, with
  CP, dK/dV of the all-gathered sequence before their reduce-scatter; twice that last term for
  flex / varlen / fa4, which take the gathered keys reordered: the reordered copy's dK/dV too),
  by when the MLP's saved activations (``4f/tp``) are freed. For Llama-3-8B (f = 3.5h, kv = h/4)
  A stays below 4f/tp for cp <= 22 (SDPA) or cp <= 11 (the reordering kernels); beyond, the
  gathered dK/dV outgrow the space the MLP's activations leave.
- fixed overhead (CUDA context, NCCL buffers, allocator fragmentation): ``overhead_gib``.
- checkpoint staging (``checkpoint_staging``): what a checkpoint save (sync or background) leaves on
  the device. The ``parallel_reshardable`` optimizer format moves the owners' fp32 state to pinned
  host memory through one device window (``training/optimizer_state.STAGING_WINDOW_BYTES``,
  ``checkpoint_window_bytes`` here), so nothing of it stays on the device while a background save
  is written; megatron's writer is handed host tensors and views of live weights. The window is
  counted on top, conservatively: it exists between steps, when the activations are free, and the
  allocator may keep its segment. (Before, the owners' share, ``12 P / (DP x CP)``, the optimizer
  term again, stayed on the device through the next step.) Host memory, not counted here: that
  share, pinned (``detail["checkpoint_host_bytes"]``).

Peak: weights + grads + optimizer + overhead + checkpoint staging + resident activations + the
larger of the loss head (its peak is at the start of the backward) and one layer's transient
activations (recompute) plus its layer backward (each layer later):
:attr:`MemoryEstimate.peak_activations`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

GiB = 1024 ** 3


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass
class MemoryOptions:
    seq_length: int = 524288
    micro_batch_size: int = 1
    num_microbatches: int = 16
    sequence_parallel: bool = True
    recompute: str = "full"  # none | selective | full
    loss_chunk_tokens: int = 2048  # 0 = unchunked
    attention_backend: str = "flex"  # flex | varlen | fa4 | te | sdpa (sdpa: a float mask per layer)
    act_bytes: int = 2  # bf16 activations
    weight_bytes: int = 2
    grad_bytes: int = 4  # fp32 main grads
    optimizer_bytes: int = 12  # fp32 master + Adam m, v
    distributed_optimizer: bool = True
    overhead_gib: float = 3.0
    checkpoint_window_bytes: int = 256 * 2**20  # = training/optimizer_state.STAGING_WINDOW_BYTES
    fused_norm: bool = True  # RMSNorm keeps its input and an fp32 rstd (GPU); False: also its normalised output (CPU)


@dataclass
class MemoryEstimate:
    layout: Layout
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    gathered_kv: float
    logits: float
    backward: float
    overhead: float
    detail: dict = field(default_factory=dict)
    checkpoint_staging: float = 0.0
    """Device bytes a checkpoint save adds (module doc)."""

    @property
    def peak_activations(self) -> float:
        """Activation-side peak: the resident activations plus the larger of the loss head's peak
        (start of the backward) and one layer's recompute + backward (later)."""
        transient = self.detail.get("transient_layer_bytes", 0.0)
        return self.activations - transient + max(self.logits, transient + self.backward)

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.peak_activations + self.overhead
                + self.checkpoint_staging)

    def as_gib(self) -> dict:
        d = {k: getattr(self, k) / GiB for k in ("weights", "grads", "optimizer", "activations",
                                                  "gathered_kv", "logits", "backward", "overhead",
                                                  "checkpoint_staging")}
        d["total"] = self.total / GiB
        return d


def layer_params(spec) -> int:
    return spec.params_per_layer()


def stage_params(spec, layout: Layout) -> int:
    """Parameters on the heaviest pipeline stage of one TP rank."""
    h, V = spec.hidden_size, spec.vocab_size
    layers = math.ceil(spec.num_layers / layout.pp)
    emb = V * h // layout.tp
    n_emb = 2 if layout.pp == 1 else 1
    return layers * layer_params(spec) // layout.tp + n_emb * emb + h


def activation_elems_per_token_layer(spec, layout: Layout, opt: MemoryOptions, seq_keys: int) -> dict:
    """Elements saved for backward per local token and layer (see module doc)."""
    h, f = spec.hidden_size, spec.ffn_hidden_size
    kv = spec.num_query_groups * spec.head_dim
    heads = spec.num_attention_heads
    tp, cp = layout.tp, layout.cp
    sp = opt.sequence_parallel and tp > 1
    norm = 2 * ((2 * h + 4 / opt.act_bytes) if opt.fused_norm else (3 * h + 1)) / (tp if sp else 1)
    tp_part = (5 * h + 3 * kv + 4 * f + heads) / tp
    gathered = (2 * kv * cp / tp) if cp > 1 else 0.0
    if opt.attention_backend in ("varlen", "fa4"):
        # The varlen kernels also keep a packed copy of each query run's document keys (up to
        # S + S/(2 CP) tokens per sample), about the size of the gathered K/V again.
        gathered *= 2
    mask = float(seq_keys) if opt.attention_backend == "sdpa" else 0.0
    attn_only = h / tp + heads / tp + mask  # what selective (core_attn) recompute does not keep
    return {"norm": norm, "tp": tp_part, "gathered_kv": gathered, "mask": mask, "attn_only": attn_only,
            "input": h / (tp if sp else 1)}


def loss_head_bytes(spec, layout: Layout, opt: MemoryOptions, local_tokens: int, *, ddp: bool = True) -> float:
    """Peak bytes of the output layer + cross-entropy beyond the saved activations (module doc).
    ``ddp=False``: no ``main_grad`` (tests, tools), the weight gradient is summed in an fp32 buffer."""
    h, Vt, a, T = spec.hidden_size, spec.vocab_size / layout.tp, opt.act_bytes, local_tokens
    if not (opt.loss_chunk_tokens and opt.loss_chunk_tokens > 0):
        return T * Vt * (a + 4 + 4)
    chunk = min(opt.loss_chunk_tokens, T) * (Vt * (4 + (a if a < 4 else 0)) + h * a)
    dummy_wgrad = Vt * h * opt.weight_bytes
    grad_hidden = T * h * a  # (its reduce-scattered shard comes once the gathered input is released)
    if not ddp:  # the fp32 buffer lives through the chunk loop, then is cast to the weights' dtype
        wgrad = Vt * h * 4
        return 16 * T + grad_hidden + wgrad + max(chunk, dummy_wgrad if opt.weight_bytes < 4 else 0)
    return 16 * T + grad_hidden + max(chunk, dummy_wgrad)


def layer_backward_elems_per_token(spec, layout: Layout, opt: MemoryOptions) -> float:
    """Gradient elements alive during one layer's backward, per local token (module doc)."""
    h, f = spec.hidden_size, spec.ffn_hidden_size
    kv = spec.num_query_groups * spec.head_dim
    tp, cp = layout.tp, layout.cp
    sp = opt.sequence_parallel and tp > 1
    residual = 2 * h / (tp if sp else 1)
    mlp = 3 * f / tp - f / tp  # d fc2-input, d fc1-output; the fc2 input is freed by then
    attention = (2 * h + 2 * kv) / tp + (2 * kv * cp / tp if cp > 1 else 0)
    if cp > 1 and opt.attention_backend in ("flex", "varlen", "fa4"):
        # These kernels take the gathered keys reordered (index_select): the reordered copy's
        # dK/dV and the gathered ones (index_select's backward) coexist before the reduce-scatter.
        attention += 2 * kv * cp / tp
    mlp_saved = 4 * f / tp  # freed once the MLP's backward is done
    return residual + max(mlp, attention - mlp_saved, 0.0)


def estimate(spec, layout: Layout, opt: MemoryOptions) -> MemoryEstimate:
    if opt.seq_length % (2 * layout.cp):
        raise ValueError(f"seq_length {opt.seq_length} not divisible by 2 x cp = {2 * layout.cp}")
    P = stage_params(spec, layout)
    weights = opt.weight_bytes * P
    grads = opt.grad_bytes * P
    shard = layout.dp * layout.cp if opt.distributed_optimizer else 1
    optimizer = opt.optimizer_bytes * P / shard

    T = opt.micro_batch_size * opt.seq_length // layout.cp  # local tokens per micro-batch
    e = activation_elems_per_token_layer(spec, layout, opt, opt.seq_length)
    a = opt.act_bytes
    full_layer_elems = e["norm"] + e["tp"] + e["gathered_kv"]
    full_layer = T * (a * full_layer_elems + 4 * e["mask"])  # float mask is fp32
    gathered_layer = T * a * e["gathered_kv"]
    layers_per_stage = math.ceil(spec.num_layers / layout.pp)
    in_flight = min(layout.pp, opt.num_microbatches)
    if opt.recompute == "none":
        per_mb = layers_per_stage * full_layer
        kv_resident = layers_per_stage * gathered_layer
        transient = 0.0
    elif opt.recompute == "selective":
        sel = full_layer - T * (a * (e["attn_only"] - e["mask"]) + 4 * e["mask"])
        per_mb = layers_per_stage * sel
        kv_resident = layers_per_stage * gathered_layer
        transient = T * (a * (e["attn_only"] - e["mask"]) + 4 * e["mask"])
    elif opt.recompute == "full":
        per_mb = layers_per_stage * T * a * e["input"]
        kv_resident = 0.0
        transient = full_layer  # one layer recomputed at a time in backward
    else:
        raise ValueError(f"recompute must be none, selective or full, not {opt.recompute!r}")
    activations = in_flight * per_mb + transient
    h, sp = spec.hidden_size, opt.sequence_parallel and layout.tp > 1
    if sp:  # megatron's sequence-parallel all-gather buffer
        activations += T * a * h
    # What the loss head keeps from forward (module doc): the final norm's input and the output
    # layer's input, released before the layers' backward.
    norm_kept = h if opt.fused_norm else 2 * h
    loss_inputs = T * a * (norm_kept / (layout.tp if sp else 1)
                           + (h if opt.loss_chunk_tokens else h / (layout.tp if sp else 1)))
    logits = loss_head_bytes(spec, layout, opt, T) + loss_inputs
    backward = T * a * layer_backward_elems_per_token(spec, layout, opt)
    return MemoryEstimate(layout, P, weights, grads, optimizer, activations, kv_resident, logits, backward,
                          opt.overhead_gib * GiB,
                          detail={"local_tokens": T, "elems_per_token_layer": e, "transient_layer_bytes": transient,
                                  "full_layer_bytes": full_layer, "in_flight_microbatches": in_flight,
                                  "checkpoint_host_bytes": optimizer, "loss_inputs_bytes": loss_inputs},
                          checkpoint_staging=float(opt.checkpoint_window_bytes))


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(spec, num_gpus: int, gpu_memory_gib: float, opt: MemoryOptions,
                   max_tp: int = 8, gpus_per_node: int = 8) -> list[tuple[MemoryEstimate, bool]]:
    """All valid TP x PP x CP x DP layouts of ``num_gpus``, best first: those that fit, ranked by
    (pipeline size, TP x CP size, TP) ascending - fewer bubbles and less communication; TP stays
    inside a node."""
    out = []
    for tp, pp in itertools.product(_divisors(num_gpus), _divisors(num_gpus)):
        if tp > min(max_tp, gpus_per_node) or spec.num_query_groups % tp or spec.num_attention_heads % tp:
            continue
        if spec.num_layers % pp or num_gpus % (tp * pp):
            continue
        for cp in _divisors(num_gpus // (tp * pp)):
            dp = num_gpus // (tp * pp * cp)
            if opt.seq_length % (2 * cp):
                continue
            if opt.sequence_parallel and tp > 1 and (opt.seq_length // cp) % tp:
                continue
            est = estimate(spec, Layout(tp, pp, cp, dp), opt)
            out.append((est, est.total <= gpu_memory_gib * GiB))
    out.sort(key=lambda x: (not x[1], x[0].layout.pp, x[0].layout.tp * x[0].layout.cp, x[0].layout.tp,
                            x[0].total))
    return out


def measure_saved_activation_bytes(model, forward) -> int:
    """Bytes of distinct tensor storages autograd saves for backward during ``forward()``
    (parameters excluded): the activation memory of a forward/backward, measured exactly."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def measure_peak_bytes(fn) -> tuple[int, object]:
    """``(peak, fn())``: the most CPU memory allocated at once while ``fn`` runs, above what was
    allocated before, from the profiler's allocation events (CPU tensors only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    current = peak = 0
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak, out


def asdict_estimate(est: MemoryEstimate) -> dict:
    return {"layout": asdict(est.layout), "params": est.params, "gib": est.as_gib()}
