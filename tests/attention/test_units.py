"""Single-process unit tests: zigzag layout, masks, NaN guard, THD padding / partitioning, config
validation, the batch split, and the TE path (skipped without TE + GPU). The kernels:
test_kernels.py (CPU) and test_kernels_gpu.py (CUDA)."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.attention.portable import (
    document_attention,
    document_causal_mask,
    gathered_positions,
    zigzag_positions,
)
from megatron_prolong.parallel.context_parallel import (
    cu_seqlens_from_doc_ids,
    prepare_batch,
    thd_pack,
    thd_partition_indices,
    validate_cp_config,
)

from . import _common as C


def test_zigzag_matches_megatron_split():
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank  # noqa: F401

    s, cp = 16, 2
    assert zigzag_positions(s, cp, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(s, cp, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(gathered_positions(s, 4).tolist()) == list(range(s))
    # same as megatron's get_batch_on_this_cp_rank view/index_select
    x = torch.arange(2 * s).view(2, s)
    for r in range(cp):
        want = x.view(2, 2 * cp, s // (2 * cp)).index_select(1, torch.tensor([r, 2 * cp - 1 - r])).reshape(2, -1)
        assert torch.equal(prepare_batch({"tokens": x, "labels": x, "loss_mask": x}, cp_size=cp,
                                         cp_rank=r)["tokens"], want)
    with pytest.raises(ValueError, match="divisible by 2 x context_parallel_size"):
        zigzag_positions(10, 2, 0)


def test_mask_and_fully_masked_row_guard():
    pos = torch.arange(6)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = document_causal_mask(pos, pos, doc)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[5].tolist() == [False] * 5 + [True]
    # a query with no allowed key (keys all in its future): zeros, never NaN
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = torch.randn(1, 2, 3, 4, requires_grad=True)
    v = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = document_attention(q, k, v, None, q_pos=torch.tensor([0, 5, 9]), k_pos=torch.tensor([3, 4, 5]),
                             softmax_scale=0.5, cache=False)
    assert torch.isfinite(out).all() and out[:, :, 0].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gqa_matches_repeated_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    doc = torch.tensor([[0] * 3 + [1] * 5, [0] * 8])
    pos = torch.arange(8)
    a = document_attention(q, k, v, doc, q_pos=pos, k_pos=pos, softmax_scale=0.25, cache=False)
    b = document_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), doc, q_pos=pos,
                           k_pos=pos, softmax_scale=0.25, cache=False)
    torch.testing.assert_close(a, b)


def test_thd_pack_and_partition():
    doc = torch.tensor([[0] * 5 + [1] * 8 + [2] * 3, [0] * 16])
    batch = {"tokens": torch.arange(32).view(2, 16) + 1, "labels": torch.arange(32).view(2, 16) + 100,
             "loss_mask": torch.ones(2, 16), "doc_ids": doc}
    assert cu_seqlens_from_doc_ids(doc[0]).tolist() == [0, 5, 13, 16]
    p = thd_pack(batch, cp_size=2)
    assert p["cu_seqlens"].tolist() == [0, 5, 13, 16, 32]
    assert p["cu_seqlens_padded"].tolist() == [0, 8, 16, 20, 36]
    assert p["max_seqlen"] == 16 and p["tokens"].shape == (1, 36)
    assert p["tokens"][0, :8].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert p["loss_mask"][0, 5:8].tolist() == [0, 0, 0] and p["loss_mask"].sum() == 32
    assert p["position_ids"][0, 8:16].tolist() == list(range(8))
    # total padded to a multiple of 2*cp*tp for sequence parallelism
    p2 = thd_pack(batch, cp_size=2, total_multiple=8)
    assert p2["cu_seqlens_padded"].tolist() == [0, 8, 16, 20, 40]
    # per-document zigzag: every token exactly once over the ranks, chunk r and 2cp-1-r per doc
    idx = [thd_partition_indices(p["cu_seqlens_padded"], 36, 2, r) for r in range(2)]
    assert sorted(torch.cat(idx).tolist()) == list(range(36))
    assert idx[0][:4].tolist() == [0, 1, 6, 7]  # doc 0 (padded 8): chunks 0 and 3 of size 2
    out = prepare_batch(batch, cp_size=2, cp_rank=1, use_te=True)
    assert out["tokens"].shape == (1, 18) and out["attention_mask"] is None
    psp = out["packed_seq_params"]
    assert psp.qkv_format == "thd" and psp.max_seqlen_q == 16
    assert psp.cu_seqlens_q_padded.dtype == torch.int32


def test_validate_cp_config_messages():
    validate_cp_config(cp_size=2, seq_length=64, use_te=False, cp_comm_type="all_gather")
    validate_cp_config(cp_size=4, seq_length=64, use_te=True, cp_comm_type="a2a+p2p", hierarchical_cp_sizes=[2, 2])
    with pytest.raises(ValueError, match="all-gather only"):
        validate_cp_config(cp_size=2, seq_length=64, use_te=False, cp_comm_type="p2p")
    with pytest.raises(ValueError, match="hierarchical_context_parallel_sizes"):
        validate_cp_config(cp_size=4, seq_length=64, use_te=True, cp_comm_type="a2a+p2p")
    with pytest.raises(ValueError, match="multiply"):
        validate_cp_config(cp_size=4, seq_length=64, use_te=True, cp_comm_type="a2a+p2p",
                           hierarchical_cp_sizes=[2, 4])
    with pytest.raises(ValueError, match="unknown"):
        validate_cp_config(cp_size=2, seq_length=64, use_te=True, cp_comm_type="ring")
    with pytest.raises(ValueError, match="divisible"):
        validate_cp_config(cp_size=4, seq_length=60, use_te=False)
    with pytest.raises(ValueError, match="one per layer"):
        validate_cp_config(cp_size=2, seq_length=64, use_te=True, cp_comm_type=["p2p"], num_layers=4)


def _te_ok():
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine_torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _te_ok(), reason="Transformer Engine + CUDA not available (TE THD/CP path is GPU-only)")
def test_te_partition_matches_pure_torch():
    import transformer_engine_torch as tex

    p = thd_pack(C.packed_batch(seed=0), cp_size=4)
    cu = p["cu_seqlens_padded"].cuda()
    for r in range(4):
        te_idx = tex.thd_get_partitioned_indices(cu, p["tokens"].shape[1], 4, r).cpu()
        assert torch.equal(te_idx.long(), thd_partition_indices(p["cu_seqlens_padded"], p["tokens"].shape[1], 4, r))
