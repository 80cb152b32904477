"""The memory planner's activation formula vs activation memory measured on tiny CPU runs
(bytes of distinct storages saved for backward, parameters excluded), and its layout search.

Tolerance: 10% (the formula ignores the RoPE table, token ids and other O(S) small tensors)."""

from __future__ import annotations

from tests.dist import run_distributed

from tests.attention import _common as C

TOL = 0.10


def _tiny_runs():
    """(recompute, S, model, micro-batch, planner estimate) for the tiny fp32 CPU runs measured here."""
    from megatron_prolong.memory_plan import Layout, MemoryOptions, estimate
    from megatron_prolong.parallel.context_parallel import prepare_batch

    for rec, over in (("none", {}), ("full", dict(recompute_granularity="full", recompute_method="uniform",
                                                  recompute_num_layers=1))):
        for S in (64, 256):
            model, _, spec = C.build(loss_chunk_tokens=32, **over)
            mb = prepare_batch(C.packed_batch(seed=0, seq=S, doc_lengths=[[S], [S // 2, S // 2]]))
            opt = MemoryOptions(seq_length=S, micro_batch_size=2, num_microbatches=1, sequence_parallel=False,
                                recompute=rec, loss_chunk_tokens=32, attention_backend="sdpa", act_bytes=4,
                                weight_bytes=4, overhead_gib=0, fused_norm=False)  # torch's RMSNorm on CPU
            yield rec, S, model, mb, estimate(spec, Layout(), opt)


def _forward(model, mb):
    return model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])


def _rank_measure():
    C.quiet()
    from megatron_prolong.memory_plan import measure_saved_activation_bytes

    rows = []
    for rec, S, model, mb, est in _tiny_runs():
        measured = measure_saved_activation_bytes(model, lambda: _forward(model, mb))
        # saved-for-backward = resident activations + what the loss head keeps: the final norm's and
        # the output layer's inputs, lse and loss (8 B/token)
        transient = est.detail["full_layer_bytes"] if rec == "full" else 0
        predicted = est.activations - transient + est.detail["loss_inputs_bytes"] + 8 * est.detail["local_tokens"]
        rows.append((rec, S, measured, predicted))
    return rows


def test_activation_formula_matches_measured():
    rows = run_distributed(_rank_measure, world_size=1)[0]
    for rec, S, measured, predicted in rows:
        print(f"recompute={rec:5} S={S:4}: measured {measured:>9} B, predicted {predicted:>11.0f} B, "
              f"ratio {predicted / measured:.3f}")
        assert abs(predicted / measured - 1) < TOL, (rec, S, measured, predicted)


def test_layout_search_512k_8b():
    from megatron_prolong.memory_plan import GiB, Layout, MemoryOptions, estimate, search_layouts
    from megatron_prolong.models.registry import get_model_spec

    spec = get_model_spec("llama3-8b")
    opt = MemoryOptions(seq_length=524288)
    best, fits = search_layouts(spec, 8, 80, opt)[0]
    assert fits and best.total <= 80 * GiB and best.layout.gpus == 8
    assert best.layout.cp * best.layout.tp >= 4  # 512K tokens need the sequence split
    # weights / grads / optimizer are exact parameter counts
    est = estimate(spec, Layout(1, 1, 8, 1), opt)
    assert est.params == spec.num_parameters()
    assert abs(est.optimizer - 12 * spec.num_parameters() / 8) < 1
    # no recompute at 512K on 8 GPUs does not fit; the chunked loss saves memory
    assert not estimate(spec, Layout(2, 1, 4, 1), MemoryOptions(seq_length=524288, recompute="none")).total < 80 * GiB
    unchunked = estimate(spec, Layout(2, 1, 4, 1), MemoryOptions(seq_length=524288, loss_chunk_tokens=0))
    assert unchunked.logits > 10 * best.logits


def test_loss_head_peak_matches_measured():
    """The chunked loss head's peak (forward + backward), measured from the allocator events of a
    CPU run, fp32, with and without a DDP ``main_grad`` (dummy weight gradient vs fp32 buffer)."""
    import torch

    from megatron_prolong.memory_plan import Layout, MemoryOptions, loss_head_bytes, measure_peak_bytes
    from megatron_prolong.models.registry import get_model_spec
    from megatron_prolong.parallel.cross_entropy import chunked_lm_loss

    spec = get_model_spec("llama3-debug")  # h 64, V 512
    torch.manual_seed(0)
    for S, N, ddp in ((256, 32, True), (512, 100, False), (128, 512, True)):
        hidden = torch.randn(S, 2, spec.hidden_size, requires_grad=True)
        weight = torch.nn.Parameter(torch.randn(spec.vocab_size, spec.hidden_size) * 0.1)
        if ddp:
            weight.main_grad, weight.grad_added_to_main_grad = torch.zeros_like(weight), False
        labels = torch.randint(0, spec.vocab_size, (2, S))
        measured, _ = measure_peak_bytes(
            lambda: chunked_lm_loss(hidden, weight, labels, chunk_tokens=N).sum().backward())
        opt = MemoryOptions(seq_length=S, micro_batch_size=2, sequence_parallel=False, loss_chunk_tokens=N,
                            act_bytes=4, weight_bytes=4)
        predicted = loss_head_bytes(spec, Layout(), opt, 2 * S, ddp=ddp)
        print(f"S={S} N={N} ddp={ddp}: measured {measured} B, predicted {predicted:.0f} B")
        assert abs(predicted / measured - 1) < 0.03, (S, N, ddp, measured, predicted)


def _rank_peak():
    C.quiet()
    import torch

    from megatron_prolong.memory_plan import measure_peak_bytes

    rows = []
    for rec, S, model, mb, est in _tiny_runs():
        for p in model.parameters():  # gradients exist before (the planner's grads term)
            p.grad = torch.zeros_like(p)
        measured, _ = measure_peak_bytes(lambda: _forward(model, mb).sum().backward())
        rows.append((rec, S, measured, est.peak_activations))
    return rows


def test_peak_activation_memory_brackets_measured():
    """Resident activations + max(loss head, recomputed layer + its backward) vs the measured peak
    of a whole forward + backward (CPU allocator events, fp32). The planner may over-count (it
    adds per-layer terms whose maxima need not coincide), never under-count by more than 5%."""
    rows = run_distributed(_rank_peak, world_size=1)[0]
    for rec, S, measured, predicted in rows:
        print(f"recompute={rec:5} S={S:4}: measured peak {measured:>9} B, predicted {predicted:>10.0f} B, "
              f"ratio {predicted / measured:.3f}")
        assert 0.95 < predicted / measured < 1.25, (rec, S, measured, predicted)


def test_checkpoint_staging_term():
    """A save leaves only the staging window on the device (the owners' optimizer share goes to
    pinned host memory); that share on the device ran the 8-GPU 512K layout out of 80 GiB."""
    from megatron_prolong.memory_plan import GiB, Layout, MemoryOptions, estimate
    from megatron_prolong.models.registry import get_model_spec
    from megatron_prolong.training.optimizer_state import STAGING_WINDOW_BYTES

    opt = MemoryOptions(seq_length=524288)
    assert opt.checkpoint_window_bytes == STAGING_WINDOW_BYTES
    est = estimate(get_model_spec("llama3-8b"), Layout(tp=2, cp=4), opt)
    assert est.checkpoint_staging == STAGING_WINDOW_BYTES and est.as_gib()["checkpoint_staging"] == 0.25
    without = estimate(get_model_spec("llama3-8b"), Layout(tp=2, cp=4), MemoryOptions(seq_length=524288,
                                                                                       checkpoint_window_bytes=0))
    assert est.total - without.total == STAGING_WINDOW_BYTES
    assert est.detail["checkpoint_host_bytes"] == est.optimizer  # the owners' share, now on the host
    assert est.total <= 80 * GiB < without.total + est.optimizer
