"""The portable attention's CUDA kernels (flex, varlen, fa4) against a blocked fp32 reference, on
document-packed batches with ragged documents at 4K-16K tokens, forward and backward, on the full
sequence and with the zigzag and the balanced CP layouts simulated on one GPU. ``pytest -m gpu``
on a GPU machine (skipped elsewhere, with the reason, by tests/conftest.py).

Tolerances: fp32 (flex only: the FlashAttention kernels take bf16/fp16) within 2e-4 of the
largest reference value; bf16 at most 3x the error of the same reference computed in bf16, plus
1e-3 of the largest value (the FlashAttention test suite's criterion, with margin). A wrong mask
is off by O(1). Each case stays within a few GB (the reference runs 512 queries at a time).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_prolong.attention import portable
from megatron_prolong.attention.backends import unavailable_reason
from megatron_prolong.attention.portable import document_attention

from . import _common as C

pytestmark = pytest.mark.gpu

HEADS, KV_HEADS = 8, 2


def _skip_unless_available(backend):
    reason = unavailable_reason(backend, cuda=True) if torch.cuda.is_available() else "no CUDA"
    if reason:
        pytest.skip(reason)
    if backend == "fa4" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FlashAttention-4 needs Hopper or Blackwell")


def _inputs(batch, S, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, HEADS, S, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, KV_HEADS, S, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, KV_HEADS, S, D, device="cuda", generator=g).to(dtype)
    dout = torch.randn(batch, HEADS, S, D, device="cuda", generator=g).to(dtype)
    # documents up to S/3 long: several cross the CP chunk borders, some are longer than a chunk
    doc = C.ragged_doc_ids(batch, S, seed=seed, max_doc=S // 3, device="cuda")
    return q, k, v, dout, doc


def _check(got, q, k, v, doc, dout, scale, dtype):
    ref = C.blocked_reference(q, k, v, doc, scale, dout)
    lowp = C.blocked_reference(q, k, v, doc, scale, dout, dtype=dtype) if dtype != torch.float32 else None
    for name, a, r, i in zip(("out", "dq", "dk", "dv"), got, ref, range(4)):
        err = float((a.float() - r).abs().max())
        top = float(r.abs().max())
        if lowp is None:
            assert err <= 2e-4 * top, (name, err, top)
        else:
            ref_err = float((lowp[i].float() - r).abs().max())
            assert err <= 3 * ref_err + 1e-3 * top, (name, err, ref_err, top)


def _run(backend, q, k, v, doc, dout, scale, cp):
    def attend(q_r, k_g, v_g, q_pos, k_pos):
        return document_attention(q_r, k_g, v_g, doc, q_pos=q_pos, k_pos=k_pos, softmax_scale=scale,
                                  backend=backend)

    portable.clear_caches()
    return C.simulate_cp(attend, q, k, v, dout, cp)


CASES = [  # (batch, S, head_dim, dtype)
    (2, 4096, 64, torch.float32),
    (2, 4096, 128, torch.bfloat16),
    (1, 16384, 128, torch.bfloat16),
]


@pytest.mark.parametrize("backend", ["flex", "varlen", "fa4"])
@pytest.mark.parametrize("batch,S,D,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kernel_matches_reference_full_sequence(backend, batch, S, D, dtype):
    _skip_unless_available(backend)
    if dtype == torch.float32 and backend != "flex":
        pytest.skip("FlashAttention kernels take bf16/fp16 only")
    q, k, v, dout, doc = _inputs(batch, S, D, dtype, seed=S + D)
    scale = 1 / math.sqrt(D)
    _check(_run(backend, q, k, v, doc, dout, scale, cp=1), q, k, v, doc, dout, scale, dtype)


@pytest.mark.parametrize("backend", ["flex", "varlen", "fa4"])
@pytest.mark.parametrize("cp", [2, 4])
def test_kernel_matches_reference_zigzag_cp(backend, cp):
    _skip_unless_available(backend)
    dtype = torch.bfloat16
    q, k, v, dout, doc = _inputs(2, 8192, 128, dtype, seed=cp)
    scale = 1 / math.sqrt(128)
    _check(_run(backend, q, k, v, doc, dout, scale, cp=cp), q, k, v, doc, dout, scale, dtype)
    if backend == "flex":  # fp32 too, where the kernel takes it
        q, k, v, dout, doc = _inputs(1, 4096, 64, torch.float32, seed=cp)
        _check(_run(backend, q, k, v, doc, dout, 0.125, cp=cp), q, k, v, doc, dout, 0.125, torch.float32)


@pytest.mark.parametrize("backend", ["flex", "varlen", "fa4"])
@pytest.mark.parametrize("cp", [2, 8])
def test_kernel_matches_reference_balanced_cp(backend, cp):
    """The balanced split (prepare_batch's: pieces of each document, every sample its own way, the
    micro-batch as one sequence), flex with its keys put in position order and the exact mask."""
    _skip_unless_available(backend)
    dtype = torch.bfloat16
    q, k, v, dout, doc = _inputs(2, 8192, 128, dtype, seed=10 + cp)
    scale = 1 / math.sqrt(128)

    def attend(q_r, k_g, v_g, q_pos, k_pos, docs):
        return document_attention(q_r, k_g, v_g, docs, q_pos=q_pos, k_pos=k_pos, softmax_scale=scale,
                                  backend=backend)

    portable.clear_caches()
    _check(C.simulate_cp_layout(attend, q, k, v, dout, doc, cp), q, k, v, doc, dout, scale, dtype)


def test_flex_failure_raises_instead_of_falling_back(monkeypatch):
    def out_of_memory(*a, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(portable, "flex_document_attention", out_of_memory)
    q, k, v, _, doc = _inputs(1, 1024, 64, torch.bfloat16, seed=0)
    pos = torch.arange(1024, device="cuda")
    for _ in range(2):  # and again: nothing switched the rank to a dense mask
        with pytest.raises(torch.OutOfMemoryError) as info:
            document_attention(q, k, v, doc, q_pos=pos, k_pos=pos, softmax_scale=0.1, backend="auto")
        assert "backend 'flex' failed" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("backend", ["varlen", "fa4"])
def test_flash_kernels_refuse_fp32_clearly(backend):
    _skip_unless_available(backend)
    q, k, v, _, doc = _inputs(1, 256, 64, torch.float32, seed=0)
    pos = torch.arange(256, device="cuda")
    with pytest.raises(TypeError, match="bf16 or fp16"):
        document_attention(q, k, v, doc, q_pos=pos, k_pos=pos, softmax_scale=0.1, backend=backend)
