"""The chunked cross-entropy's weight gradient: bf16 inputs, fp32 accumulation, straight into
megatron DDP's fp32 ``main_grad`` (no bf16 rounding of the sum, not added twice by DDP's hook).

Inputs are chosen so that the bf16 logits are exact (hidden in {-1, 0, 1}, weights multiples of
1/4, |logit| <= 8): the only rounding left in the algorithm is that of d logits to bf16, which
the fp64 reference reproduces. The summed gradient then matches the reference far more closely
than any bf16-rounded gradient can."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.parallel.cross_entropy import chunked_lm_loss
from tests.dist import run_distributed

S, B, H, V, CHUNK = 48, 2, 16, 64, 20


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-1, 2, (S, B, H), generator=g).to(torch.bfloat16)
    weight = (torch.randint(-2, 3, (V, H), generator=g) / 4).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, S), generator=g)
    grad_out = torch.rand(B, S, generator=g)
    return hidden, weight, labels, grad_out


def _reference_wgrad(hidden, weight, labels, grad_out) -> torch.Tensor:
    """fp64 sum over tokens of bf16(d logits) x hidden: the exact value of what the kernel sums."""
    h = hidden.reshape(S * B, H).double()
    logits = h @ weight.double().t()
    probs = torch.softmax(logits, dim=-1)
    target = labels.t().reshape(-1)
    probs[torch.arange(S * B), target] -= 1
    d_logits = (probs * grad_out.t().reshape(-1, 1).double()).to(torch.bfloat16).double()
    return d_logits.t() @ h


def _bf16_rounding_error(ref: torch.Tensor) -> float:
    return (ref.to(torch.bfloat16).double() - ref).abs().max().item()


def test_accumulate_matmul_bf16_into_fp32_on_cpu():
    from megatron_prolong.parallel.cross_entropy import accumulate_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 300, generator=g).to(torch.bfloat16)
    b = torch.randn(300, 24, generator=g).to(torch.bfloat16)
    acc = torch.randn(32, 24, generator=g)
    want = acc.double() + a.double() @ b.double()
    accumulate_matmul(acc, a, b)
    assert acc.dtype == torch.float32
    err = (acc.double() - want).abs().max().item()
    assert err < 1e-4 and err < _bf16_rounding_error(want) / 10, err
    # Same-dtype path (fp64 tests, fp32 CPU training).
    acc64 = torch.zeros(32, 24, dtype=torch.float64)
    accumulate_matmul(acc64, a.double(), b.double())
    torch.testing.assert_close(acc64, a.double() @ b.double(), rtol=0, atol=0)


@pytest.mark.gpu
def test_accumulate_matmul_bf16_into_fp32_on_cuda():
    """On CUDA: the bf16 x bf16 -> fp32 GEMM that adds into the fp32 buffer, where this torch has
    it (else the upcast fallback); either way fp32 accuracy, no bf16 rounding."""
    from megatron_prolong.parallel.cross_entropy import _out_dtype_addmm_works, accumulate_matmul

    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(1024, 4096, generator=g, device=dev).to(torch.bfloat16)
    b = torch.randn(4096, 512, generator=g, device=dev).to(torch.bfloat16)
    acc = torch.randn(1024, 512, generator=g, device=dev)
    want = acc.double() + a.double() @ b.double()
    fused = _out_dtype_addmm_works(dev)
    torch.cuda.synchronize()
    before = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    accumulate_matmul(acc, a, b)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    print(f"torch {torch.__version__}: out_dtype addmm {'used' if fused else 'unavailable, upcast fallback'}; "
          f"extra memory {extra} B (acc {acc.nbytes} B); peak before {before}")
    err = (acc.double() - want).abs().max().item()
    assert err < _bf16_rounding_error(want) / 10, err
    if fused:  # accumulates in place: no product-sized temporary
        assert extra < acc.nbytes // 2, extra


def test_plain_autograd_returns_the_fp32_sum_rounded_once():
    """Outside DDP the gradient is returned in the weight's dtype: the fp32 sum, rounded once."""
    hidden, weight, labels, grad_out = _inputs(1)
    w = weight.clone().requires_grad_()
    (chunked_lm_loss(hidden, w, labels, chunk_tokens=CHUNK) * grad_out).sum().backward()
    ref = _reference_wgrad(hidden, weight, labels, grad_out)
    assert w.grad.dtype == torch.bfloat16
    # Within one bf16 rounding of the exact sum (half an ulp, plus fp32 noise).
    ulp = (ref.abs().clamp_min(1e-30).log2().floor() - 7).exp2()
    assert ((w.grad.double() - ref).abs() <= 0.5 * ulp + 1e-6).all()


def _rank_ddp(overlap: bool):
    """One gloo rank: the loss head on a bf16 weight wrapped in megatron's DDP, two micro-batches."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_prolong.parallel import initialize

    initialize(device="cpu")

    class Head(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = torch.nn.Parameter(weight.clone())

        def forward(self, hidden, labels):
            return chunked_lm_loss(hidden, self.weight, labels, chunk_tokens=CHUNK)

    hidden0, weight, labels0, grad_out0 = _inputs(2)
    hidden1, _, labels1, grad_out1 = _inputs(3)
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, params_dtype=torch.bfloat16,
                               bf16=True, use_cpu_initialization=True)
    ddp = DistributedDataParallel(
        config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap),
        module=Head(weight))
    ddp.zero_grad_buffer()
    param = ddp.module.weight
    for hidden, labels, grad_out in ((hidden0, labels0, grad_out0), (hidden1, labels1, grad_out1)):
        (ddp(hidden, labels) * grad_out).sum().backward()
        assert param.grad is None  # DDP's hook ran (it clears .grad) ...
    ddp.finish_grad_sync()  # ... and, with overlap, marked the gradient ready (else this raises)
    ref = _reference_wgrad(hidden0, weight, labels0, grad_out0) + _reference_wgrad(hidden1, weight, labels1, grad_out1)
    return param.main_grad.dtype, param.main_grad.detach().double().clone(), ref


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap_grad_reduce"])
def test_ddp_main_grad_gets_the_fp32_sum_once(overlap):
    dtype, main_grad, ref = run_distributed(_rank_ddp, 1, (overlap,))[0]
    assert dtype == torch.float32
    err = (main_grad - ref).abs().max().item()
    # Not added twice (that would be off by the whole gradient, or by garbage from the dummy) and
    # never rounded to bf16 on the way. What is left: a rare d-logit whose fp32 and fp64 values
    # round to neighbouring bf16 numbers (half a bf16 ulp of one term, measured 6e-5 here)
    # against up to half a bf16 ulp of the whole sum (8e-3 here) for a bf16-rounded gradient.
    assert err < _bf16_rounding_error(ref) / 20, (err, _bf16_rounding_error(ref))
