"""Chunked cross-entropy == megatron's unchunked loss (losses and grads, fp32) at TP=1, TP=2 and
TP=2 + sequence parallelism; a few AdamW steps at CP=2 track the CP=1 loss curve. One 2-rank spawn."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist import run_distributed

from . import _common as C


def _losses_and_grads(model, batch):
    losses = C.run_model(model, batch, 1, 0)
    return losses, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _train_curve(cp, ref_state, num_layers, steps=6, lr=1e-2):
    from megatron.core import parallel_state

    from megatron_prolong.parallel.context_parallel import prepare_batch
    from megatron_prolong.parallel.cross_entropy import masked_loss_sum

    model, cfg, _ = C.build(cp=cp)
    C.load_reference_weights(model, ref_state, num_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    cp_rank = parallel_state.get_context_parallel_rank()
    group = parallel_state.get_context_parallel_group()
    curve = []
    for step in range(steps):
        batch = C.packed_batch(seed=100 + step % 2)  # two batches, revisited: the loss must fall
        mb = prepare_batch(batch, cp_size=cp, cp_rank=cp_rank)
        opt.zero_grad(set_to_none=True)
        losses = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])
        total, count = masked_loss_sum(losses, mb["loss_mask"])
        stats = torch.stack([total.detach(), count.float()])
        if cp > 1:  # what finalize_model_grads does with calculate_per_token_loss: sum over DP x CP
            dist.all_reduce(stats, group=group)
        total.backward()
        for p in model.parameters():
            if cp > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad /= stats[1]
        opt.step()
        curve.append(float(stats[0] / stats[1]))
    return curve


def _rank_loss():
    C.quiet()
    from megatron.core import parallel_state

    res = {}
    batch = C.packed_batch(seed=5)
    # --- TP=1: chunked (odd chunk size, remainder chunk) vs megatron's path ---
    ref, _, spec = C.build()
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items() if "_extra_state" not in k}
    l0, g0 = _losses_and_grads(ref, batch)
    ref.loss_chunk_tokens = 24
    l1, g1 = _losses_and_grads(ref, batch)
    res["tp1/loss"], res["tp1/grad_rel"] = C.max_diff(l1, l0), C.rel_diff(g1, g0)

    # --- TP=2 (no SP, then SP), chunked vs unchunked at the same layout and vs the TP=1 reference ---
    for sp in (False, True):
        model, _, _ = C.build(tp=2, sequence_parallel=sp)
        C.load_reference_weights(model, ref_state, spec.num_layers)
        if not sp:
            lu, gu = _losses_and_grads(model, batch)
        model.loss_chunk_tokens = 40
        lc, _ = _losses_and_grads(model, batch)
        gc = C.reduce_grads(model, sequence_parallel=sp)
        want = C.reference_grads_for_rank(model, g0, spec.num_layers)
        tag = "tp2_sp" if sp else "tp2"
        res[f"{tag}/loss"] = C.max_diff(lc, l0)
        res[f"{tag}/grad_rel"] = C.rel_diff(gc, want)
        if not sp:
            res["tp2_unchunked/loss"] = C.max_diff(lu, l0)
            res["tp2_chunked_vs_unchunked/grad_rel"] = C.rel_diff(gc, gu)

    # --- e2e: a few AdamW steps, CP=2 vs CP=1 ---
    curve1 = _train_curve(1, ref_state, spec.num_layers)
    curve2 = _train_curve(2, ref_state, spec.num_layers)
    res["curve_cp1"], res["curve_cp2"] = curve1, curve2
    del parallel_state
    return res


def test_chunked_ce_and_cp2_training_curve():
    res = run_distributed(_rank_loss, world_size=2)
    for r in res:
        print(r)
        for k, v in r.items():
            if k.endswith("/loss"):
                assert v < 1e-5, (k, v)
            if k.endswith("/grad_rel"):
                assert v < 1e-4, (k, v)
        c1, c2 = r["curve_cp1"], r["curve_cp2"]
        assert c1[-1] < c1[0], c1  # it learns
        for a, b in zip(c1, c2):
            assert abs(a - b) <= 1e-4 * abs(a), (c1, c2)


def test_chunked_ce_no_tp_matches_reference_math():
    """Single process, no megatron state: chunked CE == torch cross_entropy (losses + grads)."""
    from megatron_prolong.parallel.cross_entropy import chunked_lm_loss

    torch.manual_seed(0)
    s, b, h, v = 13, 3, 8, 50
    hid = torch.randn(s, b, h, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, v, (b, s))
    gout = torch.rand(b, s, dtype=torch.float64)
    out = chunked_lm_loss(hid, w, lab, chunk_tokens=5)
    (out * gout).sum().backward()
    gh, gw = hid.grad.clone(), w.grad.clone()
    hid.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((hid @ w.t()).reshape(-1, v),
                                            lab.t().reshape(-1), reduction="none").view(s, b).t()
    (ref * gout).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, hid.grad)
    torch.testing.assert_close(gw, w.grad)
