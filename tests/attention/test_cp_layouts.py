"""CP=4, TP=2 x CP=2 (with sequence parallelism) and PP=2 x CP=2 (megatron's 1F1B schedule) match
the single-rank result on packed multi-document samples. One 4-rank spawn."""

from __future__ import annotations

import torch

from tests.dist import run_distributed

from . import _common as C


def _reference(batch):
    ref, cfg, spec = C.build()
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items() if "_extra_state" not in k}
    ref_losses = C.run_model(ref, batch, 1, 0)
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    return spec, ref_state, ref_losses, ref_grads


def _pp_run(model, batch, cp, seq):
    """Two micro-batches (one sample each) through megatron's pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.parallel.context_parallel import prepare_batch
    from megatron_prolong.parallel.cross_entropy import masked_loss_sum

    cp_rank = parallel_state.get_context_parallel_rank()
    mbs = [prepare_batch({k: v[i:i + 1] for k, v in batch.items()}, cp_size=cp, cp_rank=cp_rank)
           for i in range(batch["tokens"].shape[0])]
    collected = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])

        def loss_func(losses):
            collected.append(losses.detach())
            total, count = masked_loss_sum(losses, mb["loss_mask"])
            return total, count, {"lm loss": total.detach()}

        return out, loss_func

    model.zero_grad(set_to_none=True)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                                num_microbatches=len(mbs), seq_length=seq, micro_batch_size=1,
                                forward_only=False)
    return torch.cat(collected, 0) if collected else None


def _rank_layouts():
    C.quiet()
    from megatron.core import parallel_state

    batch = C.packed_batch(seed=3)
    spec, ref_state, ref_losses, ref_grads = _reference(batch)
    results = {}
    layouts = {
        "cp4": dict(cp=4),
        "tp2_cp2_sp": dict(tp=2, cp=2, sequence_parallel=True),
        "pp2_cp2": dict(pp=2, cp=2, pipeline_dtype=torch.float32),
    }
    for name, lay in layouts.items():
        cp = lay["cp"]
        model, cfg, _ = C.build(**lay)
        C.load_reference_weights(model, ref_state, spec.num_layers)
        cp_rank = parallel_state.get_context_parallel_rank()
        if lay.get("pp", 1) > 1:
            local = _pp_run(model, batch, cp, C.SEQ)
        else:
            local = C.run_model(model, batch, cp, cp_rank)
        grads = C.reduce_grads(model, sequence_parallel=lay.get("sequence_parallel", False))
        want = C.reference_grads_for_rank(model, ref_grads, spec.num_layers)
        results[f"{name}/grad_rel"] = C.rel_diff(grads, want)
        if local is not None:  # last pipeline stage
            full = C.gather_cp_losses(local, cp, C.SEQ, batch)
            results[f"{name}/loss"] = C.max_diff(full, ref_losses)
    return results


def test_cp4_tp2cp2_pp2cp2_match_single_rank():
    res = run_distributed(_rank_layouts, world_size=4)
    seen_pp_loss = False
    for r in res:
        print(r)
        for k, v in r.items():
            if k.endswith("/loss"):
                assert v < 1e-5, (k, v)
                seen_pp_loss |= k.startswith("pp2")
            if k.endswith("/grad_rel"):
                assert v < 1e-4, (k, v)
        assert "cp4/loss" in r and "tp2_cp2_sp/loss" in r
    assert seen_pp_loss
