"""Shared helpers for the long-context parity tests (run inside spawned gloo ranks).

- ``packed_batch``: a deterministic multi-document micro-batch (incl. documents that cross the CP
  chunk borders and one longer than a CP chunk).
- ``build``: (re)initialise megatron's groups for a TP/PP/CP layout and build llama3-debug.
- ``load_reference_weights``: copy a single-rank reference state dict into any TP/PP layout.
- ``reference_run``: single-layout forward/backward on the full sequence.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

SEQ = 64
SPEC = "llama3-debug"


def packed_batch(seed: int = 0, batch: int = 2, seq: int = SEQ, doc_lengths=None, vocab: int = 512):
    """tokens/labels/loss_mask/doc_ids [B, S]. Sample 0: a 37-token document (longer than a CP=2
    chunk of 16 tokens, crossing borders) + short ones; sample 1: random lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    docs = []
    for b in range(batch):
        if doc_lengths is not None:
            lens = doc_lengths[b]
        elif b == 0:
            lens = [5, 37, 3, seq - 45]
        else:
            lens, left = [], seq
            while left > 0:
                n = min(left, int(torch.randint(1, 20, (1,), generator=g)))
                lens.append(n)
                left -= n
        assert sum(lens) == seq, lens
        docs.append(torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)))
    doc_ids = torch.stack(docs)
    loss_mask = torch.ones(batch, seq)
    # the last token of each document does not predict the next document
    ends = torch.zeros_like(loss_mask, dtype=torch.bool)
    ends[:, :-1] = doc_ids[:, 1:] != doc_ids[:, :-1]
    loss_mask[ends] = 0
    loss_mask[:, 7] = 0  # an arbitrary masked position (SFT-style)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "doc_ids": doc_ids}


def build(tp=1, pp=1, cp=1, seed=1234, sequence_parallel=False, spec_overrides=None, **cfg_overrides):
    """(Re)initialise parallel state for this layout and build this stage's model (fp32, CPU)."""
    from megatron.core import parallel_state

    from megatron_prolong.models import build_gpt_model, build_transformer_config, get_model_spec
    from megatron_prolong.parallel.state import initialize

    initialize(tp, pp, cp, device="cpu", seed=seed)
    spec = get_model_spec(SPEC, **(spec_overrides or {}))
    loss_chunk_tokens = cfg_overrides.pop("loss_chunk_tokens", 0)
    cfg = build_transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   context_parallel_size=cp, sequence_parallel=sequence_parallel,
                                   **cfg_overrides)
    pre, post = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = build_gpt_model(spec, cfg, pre_process=pre, post_process=post, use_te=False)
    model.loss_chunk_tokens = loss_chunk_tokens
    return model, cfg, spec


def shard_reference_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Slice a full (TP=1) tensor the way megatron shards it for ``tp_rank`` of ``tp_size``."""
    if tp_size == 1:
        return full
    if name.endswith("mlp.linear_fc1.weight"):
        # [gate; up], each rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        # qkv: per query group [q heads, k, v] -> contiguous dim-0 split; vocab-parallel on dim 0
        return full.chunk(tp_size, 0)[tp_rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp_size, 1)[tp_rank]
    return full  # norms: replicated


def stage_to_global_name(name: str, layer_offset: int) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)


def layer_offset(num_layers: int) -> int:
    from megatron.core import parallel_state

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * (num_layers // pp)


def load_reference_weights(model, ref_state: dict, num_layers: int) -> None:
    """Copy the full reference weights (TP=1, PP=1 names) into this rank's TP/PP shard."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    off = layer_offset(num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = ref_state[stage_to_global_name(name, off)]
            shard = shard_reference_tensor(name, full, tp_rank, tp_size)
            assert shard.shape == p.shape, (name, shard.shape, p.shape)
            p.copy_(shard)


def reference_grads_for_rank(model, ref_grads: dict, num_layers: int) -> dict:
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    off = layer_offset(num_layers)
    return {n: shard_reference_tensor(n, ref_grads[stage_to_global_name(n, off)], tp_rank, tp_size)
            for n, _ in model.named_parameters()}


def reduce_grads(model, sequence_parallel=False) -> dict:
    """Grads summed over CP (what megatron's DP x CP grad all-reduce does), SP norm grads summed
    over TP (what finalize_model_grads does)."""
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        if parallel_state.get_context_parallel_world_size() > 1:
            dist.all_reduce(g, group=cp_group)
        if sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=tp_group)
        out[n] = g
    return out


def run_model(model, batch, cp, cp_rank):
    """Forward + backward of sum(masked losses) on this CP rank; returns the local losses."""
    from megatron_prolong.parallel.context_parallel import prepare_batch
    from megatron_prolong.parallel.cross_entropy import masked_loss_sum

    mb = prepare_batch(batch, cp_size=cp, cp_rank=cp_rank)
    model.zero_grad(set_to_none=True)
    losses = model(mb["tokens"], mb["position_ids"], mb["attention_mask"], labels=mb["labels"])
    total, _ = masked_loss_sum(losses, mb["loss_mask"])
    total.backward()
    return losses.detach()


def gather_cp_losses(local: torch.Tensor, cp: int, seq: int, batch: dict) -> torch.Tensor:
    """Per-token losses of the full sequence in global order, from every CP rank's local ones
    (placed by the positions ``prepare_batch`` gives each rank for ``batch``)."""
    from megatron.core import parallel_state

    from megatron_prolong.parallel.context_parallel import prepare_batch

    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_context_parallel_group())
    full = torch.empty(local.shape[0], seq, dtype=local.dtype)
    for r, part in enumerate(parts):
        full.scatter_(1, prepare_batch(batch, cp_size=cp, cp_rank=r)["position_ids"], part)
    return full


def max_diff(a: dict | torch.Tensor, b: dict | torch.Tensor) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max())
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor max-abs difference divided by that tensor's max-abs value."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def quiet():
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


# ----------------------------------------------------------------------------------------------
# Kernel-level helpers: ragged documents, a blocked reference, context parallelism on one device
# ----------------------------------------------------------------------------------------------


def ragged_doc_ids(batch: int, seq: int, seed: int = 0, max_doc: int = 0, device="cpu") -> torch.Tensor:
    """``[batch, seq]`` non-decreasing document ids of random lengths in 1..max_doc (default
    seq // 3: some documents longer than a CP chunk), plus one 1-token document per sample."""
    g = torch.Generator().manual_seed(seed)
    max_doc = max_doc or max(2, seq // 3)
    rows = []
    for _ in range(batch):
        lens, left = [1], seq - 1
        while left > 0:
            n = min(left, int(torch.randint(1, max_doc + 1, (1,), generator=g)))
            lens.append(n)
            left -= n
        perm = torch.randperm(len(lens), generator=g)
        lens = torch.tensor(lens)[perm]
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), lens))
    return torch.stack(rows).to(device)


def blocked_reference(q, k, v, doc_ids, softmax_scale, dout, block: int = 512, dtype=torch.float32):
    """Full-sequence document-causal attention and its gradients, SDPA one query block at a time
    (never the whole ``S x S`` mask or score matrix). ``q`` ``[b, h, S, d]``, ``k``/``v``
    ``[b, hkv, S, d]``; returns ``out, dq, dk, dv`` in ``dtype``."""
    import torch.nn.functional as F

    S = q.shape[2]
    q, k, v, dout = (t.detach().to(dtype) for t in (q, k, v, dout))
    k_leaf, v_leaf = k.clone().requires_grad_(), v.clone().requires_grad_()
    pos = torch.arange(S, device=q.device)
    outs, dqs = [], []
    for s in range(0, S, block):
        e = min(S, s + block)
        qb = q[:, :, s:e].clone().requires_grad_()
        kb, vb = k_leaf[:, :, :e], v_leaf[:, :, :e]  # causal: nothing after the block is needed
        mask = (pos[s:e, None] >= pos[None, :e])[None, None]
        if doc_ids is not None:
            mask = mask & (doc_ids[:, s:e, None] == doc_ids[:, None, :e])[:, None]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=softmax_scale,
                                            enable_gqa=q.shape[1] != k.shape[1])
        ob.backward(dout[:, :, s:e])
        outs.append(ob.detach())
        dqs.append(qb.grad)
    return torch.cat(outs, 2), torch.cat(dqs, 2), k_leaf.grad, v_leaf.grad


def simulate_cp(attend, q, k, v, dout, cp: int):
    """Run ``attend(q_r, k_g, v_g, q_pos, k_pos)`` as each of ``cp`` zigzag ranks would (local
    queries, keys all-gathered in rank order) and reassemble the full-sequence output and
    gradients (dK/dV summed over ranks, as the reduce-scatter does), in fp32 (so that the sum
    over ranks adds no rounding of its own)."""
    from megatron_prolong.parallel.cp_layout import gathered_positions, zigzag_positions

    S = q.shape[2]
    out, dq = torch.zeros_like(q, dtype=torch.float32), torch.zeros_like(q, dtype=torch.float32)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    k_pos = gathered_positions(S, cp, device=q.device)
    for r in range(cp):
        q_pos = zigzag_positions(S, cp, r, device=q.device)
        q_r = q[:, :, q_pos].detach().requires_grad_()
        k_g = k[:, :, k_pos].detach().requires_grad_()
        v_g = v[:, :, k_pos].detach().requires_grad_()
        o = attend(q_r, k_g, v_g, q_pos, k_pos)
        o.backward(dout[:, :, q_pos])
        out[:, :, q_pos] = o.detach().float()
        dq[:, :, q_pos] = q_r.grad.float()
        dk[:, :, k_pos] += k_g.grad.float()
        dv[:, :, k_pos] += v_g.grad.float()
    return out, dq, dk, dv


def simulate_cp_layout(attend, q, k, v, dout, doc_ids, cp: int):
    """``simulate_cp`` for ``prepare_batch``'s balanced layout: every sample split its own way,
    the micro-batch seen as one sequence of ``b*S`` positions (``flat_layout_positions``, as the
    attention module sees it). ``attend(q_r, k_g, v_g, q_pos, k_pos, docs)`` gets ``[1, h, ., d]``
    tensors; the full-sequence output and gradients come back as ``[b, h, S, d]`` (fp32)."""
    from megatron_prolong.parallel.context_parallel import balanced_orders
    from megatron_prolong.parallel.cp_layout import flat_layout_positions

    b, S = doc_ids.shape
    layout = torch.stack([doc_ids.long(), balanced_orders(doc_ids, cp)])
    flat = [t.transpose(0, 1).reshape(1, t.shape[1], b * S, t.shape[3]) for t in (q, k, v, dout)]
    out, dq = torch.zeros_like(flat[0], dtype=torch.float32), torch.zeros_like(flat[0], dtype=torch.float32)
    dk, dv = torch.zeros_like(flat[1], dtype=torch.float32), torch.zeros_like(flat[2], dtype=torch.float32)
    for r in range(cp):
        q_pos, k_pos, docs = flat_layout_positions(layout, cp, r)
        q_r = flat[0][:, :, q_pos].detach().requires_grad_()
        k_g = flat[1][:, :, k_pos].detach().requires_grad_()
        v_g = flat[2][:, :, k_pos].detach().requires_grad_()
        o = attend(q_r, k_g, v_g, q_pos, k_pos, docs)
        o.backward(flat[3][:, :, q_pos])
        out[:, :, q_pos] = o.detach().float()
        dq[:, :, q_pos] = q_r.grad.float()
        dk[:, :, k_pos] += k_g.grad.float()
        dv[:, :, k_pos] += v_g.grad.float()
    return [t.reshape(t.shape[1], b, S, t.shape[3]).transpose(0, 1) for t in (out, dq, dk, dv)]
