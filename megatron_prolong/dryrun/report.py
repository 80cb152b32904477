"""The dry run's tables: memory next to ``memory_plan``, FLOPs next to the analytic formula,
collectives by group, GEMMs by dtype, host syncs.

Memory is compared where the planner and the step mean the same thing:

- ``weights``, ``grads``, ``optimizer``: what holds them after the step (the optimizer's fp32
  master shard from the build, Adam's moments from the step's first update);
- ``loss-head peak`` / ``layer-backward peak``: the live total above weights, grads and
  optimizer state at the step's peak while the loss head runs and while the layers run backward;
  planned: resident activations + loss head, and resident activations + one layer's recompute +
  its backward (``MemoryEstimate.peak_activations`` is the larger);
- ``step peak``: the larger, plus weights, grads and the optimizer state (with Adam's moments,
  which exist from the second step on): the planner's total without its fixed overhead.
"""

from __future__ import annotations

from ..flops import training_flops
from ..memory_plan import GiB, Layout, MemoryOptions, estimate

TOLERANCE = 0.10
"""Planner vs dry run: a larger relative difference is flagged."""

STATIC = ("weights", "grads", "optimizer")


def plan_for(result):
    """``memory_plan.estimate`` for the layout and options of the dry-run step."""
    cfg, p, t = result.cfg, result.cfg.parallel, result.cfg.train
    bf16 = result.decisions["bf16"]
    opt = MemoryOptions(
        seq_length=t.seq_length, micro_batch_size=t.micro_batch_size, num_microbatches=result.micro_batches,
        sequence_parallel=p.sequence_parallel, recompute=t.recompute, loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        attention_backend=result.decisions["attention_backend"], act_bytes=2 if bf16 else 4,
        weight_bytes=2 if bf16 else 4, optimizer_bytes=12 if bf16 else 8,
        distributed_optimizer=p.distributed_optimizer, overhead_gib=0.0)
    return estimate(result.spec, Layout(p.tensor, p.pipeline, p.context, result.coords["dp_size"]), opt)


def _above_static(peak: dict) -> int:
    by = peak["by_category"]
    return peak["total"] - sum(by.get(c, 0) for c in STATIC)


def memory_rows(result) -> list[tuple[str, float, float]]:
    """(what, dry run bytes, planned bytes) rows of the comparison (module doc)."""
    plan = plan_for(result)
    mem = result.memory
    static = mem["static"]
    resident = plan.activations - plan.detail["transient_layer_bytes"]
    loss_head = _above_static(mem["peak_loss_head"])
    layer = _above_static(mem["peak_layer_backward"])
    rows = [("weights", static["weights"], plan.weights), ("grads", static["grads"], plan.grads),
            ("optimizer", static["optimizer"], plan.optimizer),
            ("loss-head peak", loss_head, resident + plan.logits),
            ("layer-backward peak", layer, plan.activations + plan.backward),
            ("step peak", sum(static.values()) + max(loss_head, layer),
             plan.weights + plan.grads + plan.optimizer + plan.peak_activations)]
    return rows


def off_plan(result) -> list[str]:
    """The comparison rows that differ from the plan by more than ``TOLERANCE``."""
    return [what for what, dry, plan in memory_rows(result) if plan and abs(dry / plan - 1) > TOLERANCE]


def rank_attention_pairs(seq_length: int, cp_size: int, cp_rank: int, documents: list[int]) -> int:
    """Document-masked (query, key) pairs of the queries a CP rank holds in one sample: each query
    attends the tokens of its document up to itself."""
    import numpy as np

    c = seq_length // (2 * cp_size)
    pos = np.concatenate([np.arange(cp_rank * c, (cp_rank + 1) * c),
                          np.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)])
    starts = np.repeat(np.cumsum([0] + documents[:-1]), documents)
    return int((pos - starts[pos] + 1).sum())


def flop_rows(result) -> list[tuple[str, float, float]]:
    """(what, counted, analytic) FLOPs of this rank's step. Analytic GEMMs: ``flops.training_flops``'s
    dense term for this rank's share (layers of its stage / TP x CP, the output layer on the last
    stage), with the passes the step runs (full recompute: the layers' forward again; the chunked
    loss head recomputes its logits in backward). Attention, in FlopCounterMode's convention
    (backward = 2.5 x forward): document-masked pairs of this rank's queries, and every local
    query against every gathered key (what the flex formula counts; the kernel skips masked
    tiles)."""
    cfg, spec = result.cfg, result.spec
    p, t = cfg.parallel, cfg.train
    S, share = t.seq_length, p.tensor * p.context
    layers = spec.num_layers // p.pipeline
    dense_sample = training_flops(spec.replace(num_layers=layers), S, [[S]])["dense"] / 3  # one forward
    head = 2 * S * spec.hidden_size * spec.vocab_size
    layer_part = dense_sample - head
    layer_passes = 4 if t.recompute == "full" else 3
    head_passes = 4 if cfg.model.loss_chunk_tokens else 3
    samples = len(result.samples)
    gemm = samples * (layer_passes * layer_part + (head_passes * head if result.coords["last_stage"] else 0)) / share
    per_pair = 4 * spec.head_dim * spec.num_attention_heads // p.tensor * layers
    attn_passes = 1 + 2.5 + (1 if t.recompute in ("full", "selective") else 0)
    doc_pairs = sum(rank_attention_pairs(S, p.context, result.coords["cp"], docs) for docs in result.samples)
    dense_pairs = samples * (S // p.context) * S
    f = result.flops
    return [("GEMMs", f["gemm"], gemm),
            ("attention (document-masked)", f["attention"], attn_passes * per_pair * doc_pairs),
            ("attention (all local x gathered)", f["attention"], attn_passes * per_pair * dense_pairs),
            ("total", f["total"], gemm + attn_passes * per_pair * doc_pairs)]


def format_report(result) -> str:
    """The tables, as printed by ``pretrain_prolong.py --dry-run``."""
    cfg, c = result.cfg, result.coords
    p, t, d = cfg.parallel, cfg.train, result.decisions
    out = [f"dry run of rank {result.rank} of {result.world_size}: TP {p.tensor} PP {p.pipeline} CP {p.context} "
           f"DP {c['dp_size']} (this rank: tp {c['tp']} pp {c['pp']} cp {c['cp']} dp {c['dp']}), {result.spec.name}, "
           f"{t.seq_length:,} tokens x {result.micro_batches} micro-batches, {'bf16' if d['bf16'] else 'fp32'}, "
           f"attention {d['attention_backend']}, recompute {t.recompute}, loss chunks {cfg.model.loss_chunk_tokens}, "
           f"SP {p.sequence_parallel}",
           "", f"memory (GiB)               {'dry run':>9} {'plan':>9} {'diff':>7}"]
    for what, dry, plan in memory_rows(result):
        diff = dry / plan - 1 if plan else 0.0
        flag = "  <-- over 10%" if abs(diff) > TOLERANCE else ""
        out.append(f"  {what:<24} {dry / GiB:9.2f} {plan / GiB:9.2f} {diff:+7.1%}{flag}")
    for name, label in (("peak_loss_head", "at the loss-head peak"), ("peak_layer_backward",
                                                                     "at the layer-backward peak")):
        by = result.memory[name]["by_category"]
        out.append(f"  {label}: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in by.items() if v > GiB / 1000))
    out.append(f"  build peak (model + DDP buffers while DDP copies the weights in): "
               f"{result.memory['build_peak'] / GiB:.2f}")
    out += ["", f"FLOPs per step (TFLOP)     {'counted':>9} {'analytic':>9}"]
    for what, counted, analytic in flop_rows(result):
        out.append(f"  {what:<32} {counted / 1e12:9.1f} {analytic / 1e12:9.1f}")
    out.append("  GEMMs by operand dtype: " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in result.gemm_flops.items()))
    out += ["", f"collectives per step      {'calls':>7} {'GiB':>9}"]
    for group, op, calls, nbytes in result.collectives:
        out.append(f"  {group:<8} {op:<34} {calls:>6} {nbytes / GiB:9.3f}")
    out += ["", "host syncs per step (device values read on the host): "
            + (", ".join(f"{site} x{n}" for site, n in result.host_syncs.items()) or "none")]
    te = result.te_batch
    out.append(f"TE batch preparation (THD, real values): {te['micro_batches']} micro-batches of "
               f"{min(te['local_tokens']):,}-{max(te['local_tokens']):,} tokens on this rank, {te['seconds']:.1f} s")
    s = result.seconds
    out.append(f"time: build {s['build']:.0f} s, step {s['step']:.0f} s; "
               f"process peak RSS {result.peak_rss_gib:.2f} GiB")
    return "\n".join(out)


def to_json(result) -> dict:
    """The report as plain data (``--json``)."""
    return {
        "world_size": result.world_size, "rank": result.rank, "coords": result.coords, "decisions": result.decisions,
        "micro_batches": result.micro_batches, "memory": result.memory,
        "memory_vs_plan": [{"what": w, "dry_run": d, "plan": p} for w, d, p in memory_rows(result)],
        "off_plan": off_plan(result),
        "flops": result.flops, "flops_vs_analytic": [{"what": w, "counted": c, "analytic": a}
                                                     for w, c, a in flop_rows(result)],
        "gemm_flops_by_dtype": result.gemm_flops,
        "collectives": [{"group": g, "op": o, "calls": c, "bytes": b} for g, o, c, b in result.collectives],
        "host_syncs": result.host_syncs, "te_batch": result.te_batch, "step": result.step,
        "seconds": result.seconds, "peak_rss_gib": result.peak_rss_gib,
    }
