"""Kernel plumbing of the portable attention, on CPU: the layout caches (no stale document mask,
one build per micro-batch under activation recompute), the flex block mask built without
create_block_mask, the varlen cu_seqlens plan for zigzag context parallelism, and the
construction-time availability checks. The kernels themselves: test_kernels_gpu.py."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from megatron_prolong.attention import backends, portable
from megatron_prolong.attention.flex import document_block_flags
from megatron_prolong.attention.layout_cache import LayoutCache
from megatron_prolong.attention.portable import document_attention, document_causal_mask
from megatron_prolong.attention.varlen import sdpa_varlen_kernel, varlen_document_attention, varlen_plan
from megatron_prolong.parallel.context_parallel import balanced_orders as portable_balanced_orders
from megatron_prolong.parallel.cp_layout import flat_layout_positions, gathered_positions, zigzag_positions
from tests.dist import run_distributed

from . import _common as C


def _qkv(b=2, h=4, hkv=2, s=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g) for n in (h, hkv, hkv)]


# ----------------------------------------------------------------------------------------------
# Layout caches (review issue 8, items 5 and 7)
# ----------------------------------------------------------------------------------------------


def test_call_without_doc_ids_after_one_with_them_is_plain_causal():
    portable.clear_caches()
    q, k, v = _qkv()
    pos = torch.arange(32)
    doc = C.ragged_doc_ids(2, 32, seed=1)
    masked = document_attention(q, k, v, doc, q_pos=pos, k_pos=pos, softmax_scale=0.3)
    causal = document_attention(q, k, v, None, q_pos=pos, k_pos=pos, softmax_scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(causal, want)
    assert (masked - causal).abs().max() > 1e-3  # the documents did change the first result


def test_cache_keys_on_storage_not_identity_and_never_serves_stale_content():
    cache = LayoutCache(1)
    doc = torch.tensor([[0, 0, 1, 1]])
    assert cache.get_or_build((doc,), (), lambda: "a") == "a"
    assert cache.get_or_build((doc.detach(),), (), lambda: "b") == "a"  # recompute's detached input
    assert cache.get_or_build((None,), (), lambda: "c") == "c"  # no doc ids is a key of its own
    cache.get_or_build((doc,), (), lambda: "d")
    doc.add_(1)  # in-place write: version bump
    assert cache.get_or_build((doc,), (), lambda: "e") == "e"
    assert cache.builds == 4

    # A freed storage could be handed to the next micro-batch's doc ids at the same address: an
    # entry keeps the tensors it was built from alive until it is evicted, so that cannot happen.
    tmp = torch.tensor([[0, 1]])
    alive = weakref.ref(tmp)
    cache.get_or_build((tmp,), (), lambda: "f")
    del tmp
    gc.collect()
    assert alive() is not None
    cache.get_or_build((None,), (), lambda: "g")  # evicts it (capacity 1)
    gc.collect()
    assert alive() is None


def _rank_count_mask_builds():
    C.quiet()
    counts = {}
    calls = []
    real = portable.document_causal_mask

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    portable.document_causal_mask = counting
    batch = C.packed_batch(seed=0)
    for name, over in {"none": {},
                       "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                       "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"])}.items():
        model, cfg, spec = C.build(**over)
        for step in range(2):  # every micro-batch: one build (a fresh doc-id tensor each time)
            calls.clear()
            C.run_model(model, {k: v.clone() for k, v in batch.items()}, 1, 0)
            counts[f"{name}/{step}"] = len(calls)
        counts["layers"] = spec.num_layers
    return counts


def test_mask_built_once_per_micro_batch_under_megatron_recompute():
    counts = run_distributed(_rank_count_mask_builds, world_size=1)[0]
    print(counts)
    assert counts["layers"] > 1
    for k, n in counts.items():
        if k != "layers":
            assert n == 1, (k, n, counts)


# ----------------------------------------------------------------------------------------------
# flex block mask (built from block statistics, not create_block_mask)
# ----------------------------------------------------------------------------------------------


def _dense_blocks(num, idx, nk):
    """[B, H, nq, nk] flags from (blocks per row, column indices) as BlockMask stores them."""
    idx = idx[..., :nk].long()
    valid = torch.arange(idx.shape[-1]).expand(idx.shape) < num[..., None].long()
    return torch.zeros(num.shape + (nk,), dtype=torch.bool).scatter_(-1, idx, valid)


@pytest.mark.parametrize("S,cp", [(1024, 1), (1024, 2), (1024, 4), (768, 4)])
def test_block_mask_matches_create_block_mask(S, cp):
    from torch.nn.attention.flex_attention import create_block_mask

    from megatron_prolong.attention.flex import document_block_mask

    doc = C.ragged_doc_ids(2, S, seed=S + cp, max_doc=300)
    k_pos = gathered_positions(S, cp)
    for r in range(cp):
        q_pos = zigzag_positions(S, cp, r)
        dq, dk = doc[:, q_pos], doc[:, k_pos]
        ref = create_block_mask(lambda b, h, q, kv: (q_pos[q] >= k_pos[kv]) & (dq[b, q] == dk[b, kv]),
                                2, None, q_pos.numel(), k_pos.numel(), device="cpu")
        ours = document_block_mask(q_pos, k_pos, doc)
        nk = -(-S // 128)
        ref_full = _dense_blocks(ref.full_kv_num_blocks, ref.full_kv_indices, nk)
        ref_any = ref_full | _dense_blocks(ref.kv_num_blocks, ref.kv_indices, nk)
        our_full = _dense_blocks(ours.full_kv_num_blocks, ours.full_kv_indices, nk)
        our_any = our_full | _dense_blocks(ours.kv_num_blocks, ours.kv_indices, nk)
        assert torch.equal(our_full, ref_full)
        if (S // (2 * cp)) % 128 == 0:  # block-aligned chunks: exact
            assert torch.equal(our_any, ref_any)
        else:  # a tile may be visited needlessly, never skipped wrongly
            assert bool((our_any | ~ref_any).all())
        # the element mask of the partial tiles is the document-causal predicate
        i, j = torch.meshgrid(torch.arange(q_pos.numel()), torch.arange(k_pos.numel()), indexing="ij")
        want = document_causal_mask(q_pos, k_pos, doc)[:, 0]
        assert torch.equal(torch.stack([ours.mask_mod(b, 0, i, j) for b in range(2)]), want)


def test_block_flags_without_documents_are_causal():
    pos = torch.arange(384)
    partial, full = document_block_flags(pos, pos, None, None)
    assert partial[0, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert full[0, 0].tolist() == [[False, False, False], [True, False, False], [True, True, False]]


# ----------------------------------------------------------------------------------------------
# varlen plan: zigzag CP pieces against each document's gathered keys
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_varlen_pieces_equal_masked_attention(cp):
    S, b = 96, 2
    torch.manual_seed(cp)
    q, k, v = _qkv(b=b, s=S, seed=cp)
    dout = torch.randn_like(q)
    doc = C.ragged_doc_ids(b, S, seed=10 + cp, max_doc=40)  # documents over 12-token chunks (CP=4)
    ref = C.blocked_reference(q, k, v, doc, 0.35, dout, block=32)

    plans = []

    def attend(q_r, k_g, v_g, q_pos, k_pos):
        plan = varlen_plan(doc, q_pos, k_pos, b)
        plans.append((q_pos, plan))
        return varlen_document_attention(q_r, k_g, v_g, plan, 0.35, sdpa_varlen_kernel)

    got = C.simulate_cp(attend, q, k, v, dout, cp)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)

    c = S // (2 * cp)
    for q_pos, plan in plans:
        cu_q, cu_k = plan.cu_seqlens_q.long(), plan.cu_seqlens_k.long()
        assert plan.cu_seqlens_q.dtype == torch.int32 and int(cu_q[-1]) == b * q_pos.numel()
        assert int(cu_k[-1]) <= b * (S + c)  # the first piece of a chunk reaches back, the rest do not
        for i in range(cu_q.numel() - 1):  # keys of a piece: its document from the start to its end
            first = int(q_pos[int(cu_q[i]) % q_pos.numel()])
            keys = plan.key_positions[int(cu_k[i]):int(cu_k[i + 1])]
            n_q = int(cu_q[i + 1] - cu_q[i])
            assert int(keys[-1]) == first + n_q - 1 and torch.equal(keys, torch.arange(int(keys[0]), int(keys[-1]) + 1))
            sample = int(cu_q[i]) // q_pos.numel()
            assert int(keys[0]) == 0 or doc[sample, int(keys[0]) - 1] != doc[sample, first]
            assert bool((doc[sample, keys] == doc[sample, first]).all())
    if cp == 1:  # one sample, one rank: the keys are used in place
        assert varlen_plan(doc[:1], torch.arange(S), torch.arange(S), 1).key_rows is None


def test_varlen_plan_without_doc_ids_and_bad_inputs():
    S = 16
    q_pos, k_pos = zigzag_positions(S, 2, 0), gathered_positions(S, 2)
    plan = varlen_plan(None, q_pos, k_pos, 1)
    assert plan.cu_seqlens_q.tolist() == [0, 4, 8] and plan.cu_seqlens_k.tolist() == [0, 4, 20]
    assert (plan.max_seqlen_q, plan.max_seqlen_k) == (4, 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_plan(torch.tensor([[0] * 8 + [1] * 4 + [0] * 4]), q_pos, k_pos, 1)
    with pytest.raises(ValueError, match="every position"):
        varlen_plan(None, q_pos, k_pos[:8], 1)


# ----------------------------------------------------------------------------------------------
# The balanced CP layout (every sample split by its documents): kernels and the exact flex mask
# ----------------------------------------------------------------------------------------------


def _balanced_doc_ids(b, S, seed):
    """Documents of every size class at CP=4: one long (spread over every rank), mid-sized (over a
    few ranks), short ones (whole), 1-token ones."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lens = [S * 15 // 32, S * 5 // 32, S * 3 // 32] + [int(x) for x in torch.randint(1, S // 32, (8,), generator=g)]
        lens.append(S - sum(lens))
        lens = torch.tensor(lens)[torch.randperm(len(lens), generator=g)]
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), lens))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel", ["sdpa", "varlen"])
def test_balanced_layout_equals_full_sequence_attention(kernel):
    S, b, cp = 128, 2, 4
    q, k, v = _qkv(b=b, s=S, seed=7)
    dout = torch.randn_like(q)
    doc = _balanced_doc_ids(b, S, seed=3)
    ref = C.blocked_reference(q, k, v, doc, 0.35, dout, block=64)

    def attend(q_r, k_g, v_g, q_pos, k_pos, docs):
        if kernel == "sdpa":
            return document_attention(q_r, k_g, v_g, docs, q_pos=q_pos, k_pos=k_pos, softmax_scale=0.35, cache=False)
        return varlen_document_attention(q_r, k_g, v_g, varlen_plan(docs, q_pos, k_pos, 1), 0.35, sdpa_varlen_kernel)

    got = C.simulate_cp_layout(attend, q, k, v, dout, doc, cp)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_flex_keys_in_position_order_with_the_exact_block_mask():
    """flex_plan on the balanced layout: keys reordered to positions, every tile marked iff it
    holds an allowed pair (full iff all its pairs are), the element mask the document-causal one,
    and (eager flex_attention, forward: no CPU backward) the same output as SDPA."""
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_prolong.attention.flex import flex_plan

    S, b, cp = 384, 2, 4
    doc = _balanced_doc_ids(b, S, seed=5)
    q, k, v = _qkv(b=b, s=S, seed=2)
    layout = torch.stack([doc, portable_balanced_orders(doc, cp)])
    flat = [t.transpose(0, 1).reshape(1, t.shape[1], b * S, t.shape[3]) for t in (q, k, v)]
    n = b * S
    for r in range(cp):
        q_pos, k_pos, docs = flat_layout_positions(layout, cp, r)
        plan = flex_plan(docs, q_pos, k_pos)
        assert plan.key_rows is not None and torch.equal(k_pos[plan.key_rows], torch.arange(n))
        allowed = document_causal_mask(q_pos, torch.arange(n), docs)[0, 0]
        nq, nk = -(-q_pos.numel() // 128), -(-n // 128)
        tiles = torch.zeros(nq * 128, nk * 128, dtype=torch.bool)
        tiles[:q_pos.numel(), :n] = allowed
        tiles = tiles.view(nq, 128, nk, 128)
        complete = torch.zeros(nq, nk, dtype=torch.bool)
        complete[:q_pos.numel() // 128, :n // 128] = True
        bm = plan.block_mask
        full = _dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nk)[0, 0]
        marked = full | _dense_blocks(bm.kv_num_blocks, bm.kv_indices, nk)[0, 0]
        assert torch.equal(marked, tiles.any(3).any(1)) and torch.equal(full, tiles.all(3).all(1) & complete)
        i, j = torch.meshgrid(torch.arange(q_pos.numel()), torch.arange(n), indexing="ij")
        assert torch.equal(bm.mask_mod(0, 0, i, j), allowed)
        if r:
            continue  # eager flex_attention is slow on CPU: one rank's output is enough
        k_r, v_r = (t[:, :, k_pos].index_select(2, plan.key_rows) for t in flat[1:])
        with torch.no_grad():
            got = flex_attention(flat[0][:, :, q_pos], k_r, v_r, block_mask=bm, scale=0.35, enable_gqa=True)
        want = document_attention(flat[0][:, :, q_pos], flat[1][:, :, k_pos], flat[2][:, :, k_pos], docs,
                                  q_pos=q_pos, k_pos=k_pos, softmax_scale=0.35, cache=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Backend choice and availability
# ----------------------------------------------------------------------------------------------


def test_backend_resolution_and_availability_messages():
    assert backends.resolve_backend("auto", "cuda") == "flex"
    assert backends.resolve_backend("auto", "cpu") == "sdpa"
    assert backends.resolve_backend("auto", "cuda", dropout_p=0.1) == "sdpa"
    for name in ("flex", "varlen", "fa4"):
        with pytest.raises(backends.AttentionBackendUnavailable, match="CUDA GPU"):
            backends.check_backend(name, cuda=False)
    backends.check_backend("sdpa", cuda=False)
    backends.check_backend("auto", dropout_p=0.1, cuda=False)
    with pytest.raises(backends.AttentionBackendUnavailable, match="dropout"):
        backends.check_backend("flex", dropout_p=0.1, cuda=True)
    try:
        import flash_attn.cute  # noqa: F401
    except ImportError:
        assert "pip install flash-attn-4" in backends.unavailable_reason("fa4", cuda=True)
    from torch.nn.attention import varlen

    if "window_size" in varlen.varlen_attn.__doc__:
        assert backends.unavailable_reason("varlen", cuda=True) is None
    with pytest.raises(backends.AttentionBackendUnavailable, match="CUDA only"):
        q, k, v = _qkv()
        document_attention(q, k, v, None, q_pos=torch.arange(32), k_pos=torch.arange(32), softmax_scale=1.0,
                           backend="varlen")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_module_refuses_a_cuda_kernel_at_construction_on_cpu():
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2)
    pg = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1), cp=None)
    portable.PortableCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg, backend="sdpa")
    with pytest.raises(backends.AttentionBackendUnavailable, match="varlen needs a CUDA GPU"):
        portable.PortableCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg, backend="varlen",
                                       device_type="cpu")


def test_flex_plan_reads_no_device_value_when_the_keys_are_known():
    """As if on CUDA: the flex plan of a CP-1 layer (keys are the queries) and of the balanced
    layout (``whole_keys``: every position once, by construction) reads no value from the device,
    and the latter is the plan the checked path builds; other keys cost the one read listed."""
    from megatron_prolong.attention.flex import flex_plan
    from megatron_prolong.platform.cuda_on_cpu import CUDA0, cuda_on_cpu

    S, cp = 256, 2
    doc = _balanced_doc_ids(2, S, seed=3)
    layout = torch.stack([doc, portable_balanced_orders(doc, cp)])
    q_pos, k_pos, docs = flat_layout_positions(layout, cp, 1)
    checked = flex_plan(docs, q_pos, k_pos)
    with cuda_on_cpu() as log:
        pos = torch.arange(S, device=CUDA0)
        flex_plan(doc.to(CUDA0), pos, pos)
        known = flex_plan(docs.to(CUDA0), q_pos.to(CUDA0), k_pos.to(CUDA0), whole_keys=True)
        assert log.syncs == [], log.syncs
        flex_plan(docs.to(CUDA0), q_pos.to(CUDA0), k_pos.to(CUDA0))
        assert len(log.syncs) == 1, log.syncs
        rows, bm = known.key_rows.cpu(), known.block_mask
        pairs = [(bm.kv_num_blocks, checked.block_mask.kv_num_blocks), (bm.kv_indices, checked.block_mask.kv_indices),
                 (bm.full_kv_num_blocks, checked.block_mask.full_kv_num_blocks),
                 (bm.full_kv_indices, checked.block_mask.full_kv_indices)]
        got = [(a.cpu(), b) for a, b in pairs]
    assert torch.equal(rows, checked.key_rows)
    for a, b in got:
        assert torch.equal(a, b)
