"""The dry run at full scale: llama3-8b, 512K tokens, rank 0 of the 512K recipe's 64-GPU layout
(TP 2 x CP 16 x DP 2, sequence parallel, full recompute, 2,048-token loss chunks), on fake
tensors - and the same run with a device bug and a dtype bug planted in the model step.

One spawned process runs the dry runs (a process simulates one job). The clean step has one
micro-batch per rank (``train.global_batch_tokens`` = 2 samples over DP 2) to keep CI time down;
the layout, model, sequence length and every per-micro-batch figure are the recipe's
(``docs/dry_run.md`` has the full steps). A fourth run, TP 4 x CP 2 with two layers, is a layout
where ``memory_plan`` used to miss the loss head's peak by over 10%.
"""

from __future__ import annotations

import math

import pytest

from tests.dist import run_distributed

RECIPE = "examples/prolong_512k.yaml"
WORLD = 64
SEQ = 524288
ONE_MICRO_BATCH = [f"train.global_batch_tokens={2 * SEQ}"]
TP4_CP2 = ["parallel.tensor=4", "parallel.context=2", "model.overrides={num_layers: 2}",
           f"train.global_batch_tokens={8 * SEQ}"]  # DP 8: one micro-batch per rank


def _plant_device_bug():
    """The attention's query/key positions built on the CPU instead of the batch's device (both
    ways the portable attention gets them: the whole-sequence zigzag, and the balanced split's
    layout): the document-id lookups then mix devices (on a GPU: CUDA ids indexed by CPU positions)."""
    import torch

    from megatron_prolong.attention import portable

    positions, layout_positions = portable.layer_positions, portable.flat_layout_positions

    def on_cpu(seq_length, cp_size, cp_rank, device):
        return positions(seq_length, cp_size, cp_rank, torch.device("cpu"))

    def layout_on_cpu(layout, cp_size, cp_rank):
        return layout_positions(layout.cpu(), cp_size, cp_rank)

    portable.layer_positions, portable.flat_layout_positions = on_cpu, layout_on_cpu

    def restore():
        portable.layer_positions, portable.flat_layout_positions = positions, layout_positions

    return restore


def _plant_dtype_bug():
    """The loss head's logits computed in fp32 (hidden states and output weights upcast first)."""
    from megatron_prolong.parallel import cross_entropy

    stats = cross_entropy._chunk_stats

    def fp32_logits(h, weight, *args):
        return stats(h.float(), weight.float(), *args)

    cross_entropy._chunk_stats = fp32_logits
    return lambda: setattr(cross_entropy, "_chunk_stats", stats)


def _dry_runs():
    from megatron_prolong.dryrun import report
    from megatron_prolong.dryrun.run import dry_run
    from megatron_prolong.tools.dry_run import load_for_dry_run

    cfg, _ = load_for_dry_run(RECIPE, ONE_MICRO_BATCH)
    clean = report.to_json(dry_run(cfg, WORLD, 0, log=lambda *_: None))
    cfg, _ = load_for_dry_run(RECIPE, TP4_CP2)
    tp4 = report.to_json(dry_run(cfg, WORLD, 0, log=lambda *_: None))
    failures = {}
    for name, plant in (("device", _plant_device_bug), ("dtype", _plant_dtype_bug)):
        restore = plant()
        try:
            dry_run(load_for_dry_run(RECIPE, ONE_MICRO_BATCH)[0], WORLD, 0, log=lambda *_: None)
            failures[name] = None
        except Exception as e:  # noqa: BLE001 - what it raised is what is checked
            failures[name] = (type(e).__name__, str(e) + "\n".join(getattr(e, "__notes__", [])))
        finally:
            restore()
    return {"clean": clean, "tp4": tp4, "failures": failures}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_dry_runs, world_size=1)[0]


def test_full_scale_step_runs_and_matches_the_plan(runs):
    r = runs["clean"]
    assert r["coords"]["dp_size"] == 2 and r["micro_batches"] == 1 and not r["step"]["skipped"]
    assert r["decisions"]["bf16"] and r["decisions"]["attention_backend"] == "flex"
    for row in r["memory_vs_plan"]:
        print(f"{row['what']:<22} dry run {row['dry_run'] / 2**30:7.2f} GiB, plan {row['plan'] / 2**30:7.2f} GiB")
    assert r["off_plan"] == [], r["memory_vs_plan"]


def test_the_plan_holds_at_tp4_where_the_loss_head_keeps_the_whole_sequence(runs):
    """The loss head keeps the TP-gathered hidden states (``h`` per token, not ``h/tp``) and
    sequence parallelism keeps an all-gather buffer (``h`` per token) for the run; at TP 2 the old
    terms happened to add up, at TP 4 the loss-head peak was 14% over the plan."""
    r = runs["tp4"]
    assert r["coords"]["dp_size"] == 8 and r["micro_batches"] == 1
    for row in r["memory_vs_plan"]:
        print(f"{row['what']:<22} dry run {row['dry_run'] / 2**30:7.2f} GiB, plan {row['plan'] / 2**30:7.2f} GiB")
    assert r["off_plan"] == [], r["memory_vs_plan"]


def test_weights_grads_and_optimizer_state_are_the_parameter_count(runs):
    from megatron_prolong.models.registry import get_model_spec

    spec = get_model_spec("llama3-8b")
    params = spec.num_parameters() // 2  # TP 2: layers, embedding and output layer split; norms replicated
    static = runs["clean"]["memory"]["static"]
    # DDP pads its buffers to whole buckets: less than 0.1% here.
    assert math.isclose(static["weights"], 2 * params, rel_tol=1e-3)
    assert math.isclose(static["grads"], 4 * params, rel_tol=1e-3)
    assert math.isclose(static["optimizer"], 12 * params / (2 * 16), rel_tol=1e-3)  # sharded over DP x CP


def test_collectives_per_step(runs):
    from megatron_prolong.models.registry import get_model_spec

    spec = get_model_spec("llama3-8b")
    r = runs["clean"]
    by = {(c["group"], c["op"]): c for c in r["collectives"]}
    kv_per_token = spec.num_query_groups * spec.head_dim // 2 * 2  # KV heads of a TP rank, bf16 bytes
    # K and V all-gathered over CP in every layer's forward and again in its recompute.
    gather = by[("CP", "allgather_base")]
    assert gather["calls"] == spec.num_layers * 2 * 2
    assert gather["bytes"] == spec.num_layers * 2 * 2 * SEQ * kv_per_token
    assert by[("CP", "reduce_scatter_base")]["bytes"] == gather["bytes"] // 2  # dK, dV once, in backward
    static = r["memory"]["static"]
    # The distributed optimizer: fp32 gradients reduce-scattered, bf16 weights all-gathered, over DP x CP.
    assert by[("DPxCP", "reduce_scatter_tensor_coalesced")]["bytes"] == static["grads"]
    # (the weights' category also holds RoPE's inverse frequencies: 64 fp32 values)
    assert 0 <= static["weights"] - by[("DPxCP", "allgather_into_tensor_coalesced")]["bytes"] <= 1024
    assert by[("TP", "allgather_base")]["calls"] > 0 and by[("TP", "reduce_scatter_base")]["calls"] > 0


def test_flops_match_the_analytic_formula(runs):
    r = runs["clean"]
    rows = {row["what"]: row for row in r["flops_vs_analytic"]}
    assert math.isclose(rows["GEMMs"]["counted"], rows["GEMMs"]["analytic"], rel_tol=0.01)
    dense = rows["attention (all local x gathered)"]
    assert math.isclose(dense["counted"], dense["analytic"], rel_tol=0.01)
    assert list(r["gemm_flops_by_dtype"]) == ["bfloat16"]


def test_planted_device_bug_fails(runs):
    failure = runs["failures"]["device"]
    assert failure is not None, "the dry run did not notice CPU positions meeting device tensors"
    kind, message = failure
    assert "device" in message and "meta" in message and "cpu" in message, failure
    assert "attention" in message, failure  # where: the attention's mask / block-mask building


def test_planted_dtype_bug_fails(runs):
    failure = runs["failures"]["dtype"]
    assert failure is not None, "the dry run did not notice an fp32 GEMM in the bf16 loss head"
    kind, message = failure
    assert kind == "DtypeError" and "fp32 GEMM" in message and "cross_entropy.py" in message, failure
