"""Memory-bounded (chunked) vocab-parallel cross-entropy head, and the masked loss reduction.

``chunked_lm_loss(hidden [s, b, h], weight [V/tp, h], labels [b, s], chunk_tokens=N)`` returns the
per-token losses ``[b, s]`` (fp32) of ``softmax(hidden @ weight.T)`` without materialising the
``[s*b, V]`` logits: the forward computes the logits of ``N`` tokens at a time and keeps only
each token's log-sum-exp; the backward recomputes each chunk's logits and turns them into
``d hidden`` and ``d weight`` right away. Peak extra memory: one ``[N, V/tp]`` fp32 chunk buffer
(logits, turned in place into the softmax and its gradient) plus that chunk in the weight's dtype
(the GEMM output, then ``d logits``), instead of ``[s*b, V/tp]`` logits; memory_plan.py counts it.

Tensor parallelism: ``weight`` is the vocab-parallel shard of this rank (megatron's
``output_layer``); the max / target logit / sum-exp are all-reduced over the TP group, the same
math as ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``. The input hidden states
go through megatron's ``copy_to_tensor_model_parallel_region`` (backward: all-reduce of the partial
``d hidden``) or, with sequence parallelism, ``gather_from_sequence_parallel_region`` (backward:
reduce-scatter), exactly what ``ColumnParallelLinear`` does.

Weight gradient. Under megatron's DistributedDataParallel every parameter has an fp32
``main_grad`` (a view of the DDP gradient buffer) and a ``grad_added_to_main_grad`` flag. Like
megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` with gradient-accumulation fusion
(and TE's ``fuse_wgrad_accumulation``), each chunk's ``d logits^T @ hidden`` is accumulated straight
into ``main_grad``: inputs in the weight's dtype (bf16: the dtype megatron's output layer gets its
logits gradient in), fp32 accumulation (:func:`accumulate_matmul`), no full-size fp32 buffer, no
rounding of the summed gradient to bf16. The flag is then set and a dummy gradient returned, so
that the parameter's AccumulateGrad node, and with it DDP's backward hook (which marks the
gradient ready for an overlapped reduce), still runs while the hook skips adding it a second
time. Without DDP (no ``main_grad``) the gradient is accumulated in an fp32 buffer and returned
in the weight's dtype, as autograd expects.
"""

from __future__ import annotations


import torch
import torch.distributed as dist


def _tp_info(group):
    if group is None or not dist.is_initialized():
        return None, 1, 0
    return group, dist.get_world_size(group), dist.get_rank(group)


def _upcast(x):
    """Logits math in at least fp32 (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OUT_DTYPE_ADDMM: dict[torch.device, bool] = {}


def _out_dtype_addmm_works(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc_fp32)``
    runs and accumulates on ``device`` (checked once on tiny tensors). CUDA only, and only in torch
    versions whose ``addmm.dtype_out`` accepts an fp32 ``input`` with bf16 matrices (older ones
    require ``input`` in the matrices' dtype; CPU has no kernel at all)."""
    if device not in _OUT_DTYPE_ADDMM:
        ok = False
        if device.type == "cuda":
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            acc = torch.full((2, 2), 0.25, dtype=torch.float32, device=device)
            try:
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                ok = bool((acc == 2.25).all())
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        elif device.type == "meta":
            # A dry run's stand-in for CUDA (platform/dry_run.py) has no values to check: the GPU
            # kernel is taken to be there when this torch has the overload.
            ok = hasattr(torch.ops.aten.addmm, "dtype_out")
        _OUT_DTYPE_ADDMM[device] = ok
    return _OUT_DTYPE_ADDMM[device]


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, accumulating in ``acc``'s dtype (fp32 for bf16 ``a``, ``b``).

    CUDA with a torch whose ``addmm`` takes ``out_dtype``: one bf16 x bf16 -> fp32 GEMM that adds
    into ``acc`` (cuBLAS beta=1). Elsewhere: the matrices are upcast to ``acc``'s dtype first;
    products of bf16 values are exact in fp32, so the result is the same sum, only slower.
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and a.dtype in _LOW_PRECISION and b.dtype == a.dtype \
            and _out_dtype_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _ddp_main_grad(weight: torch.Tensor):
    """megatron DDP's fp32 gradient buffer view of ``weight``, or None outside DDP."""
    if hasattr(weight, "grad_added_to_main_grad") and getattr(weight, "main_grad", None) is not None:
        return weight.main_grad
    return None


def _chunk_stats(h, weight, target, vocab_start, vocab_end, group, world):
    """Global log-sum-exp and target logit of one chunk (from its fp32 logits)."""
    logits = _upcast(h @ weight.t())
    lmax = logits.max(dim=-1).values
    if world > 1:
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
    in_shard = (target >= vocab_start) & (target < vocab_end)
    local_t = (target - vocab_start).clamp(0, logits.shape[-1] - 1)
    pred = logits.gather(1, local_t[:, None]).squeeze(1) * in_shard
    sumexp = logits.sub_(lmax[:, None]).exp_().sum(-1)  # in place: one [chunk, v_local] buffer
    if world > 1:
        both = torch.stack([pred, sumexp])
        dist.all_reduce(both, group=group)
        pred, sumexp = both[0], both[1]
    lse = torch.log(sumexp) + lmax
    return lse, pred


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk_tokens, group):
        # hidden [n, h] (full sequence on every TP rank), weight [v_local, h], target [n]
        group, world, rank = _tp_info(group)
        v_local = weight.shape[0]
        vocab_start, vocab_end = rank * v_local, (rank + 1) * v_local
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        lses = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk_tokens):
            e = min(n, s + chunk_tokens)
            lse, pred = _chunk_stats(hidden[s:e], weight, target[s:e], vocab_start, vocab_end,
                                              group, world)
            losses[s:e] = lse - pred
            lses[s:e] = lse
        ctx.save_for_backward(hidden, weight, target, lses)
        ctx.chunk_tokens, ctx.group, ctx.world = chunk_tokens, group, world
        ctx.vocab_range = (vocab_start, vocab_end)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, target, lses = ctx.saved_tensors
        vocab_start, vocab_end = ctx.vocab_range
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lses.dtype
        main_grad = _ddp_main_grad(weight) if ctx.needs_input_grad[1] else None
        wgrad_acc = None
        if main_grad is not None:
            wgrad_acc = main_grad
        elif ctx.needs_input_grad[1]:
            wgrad_acc = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_losses = grad_losses.to(acc)
        for s in range(0, n, ctx.chunk_tokens):
            e = min(n, s + ctx.chunk_tokens)
            h = hidden[s:e]
            # One fp32 [chunk, v_local] buffer, turned in place into softmax - onehot, then
            # d loss / d logits; g is that in the weight's dtype: what megatron's output layer
            # receives (its logits are in that dtype before the loss upcasts them).
            probs = _upcast(h @ weight.t()).sub_(lses[s:e, None]).exp_()
            # softmax - onehot without a host sync (no nonzero / data-dependent shape): every row
            # adds -1 at its target's column if this shard holds it, else -0 (which leaves any
            # value unchanged), so the result is bitwise that of subtracting 1 at the held targets.
            t = target[s:e]
            in_shard = (t >= vocab_start) & (t < vocab_end)
            local_t = (t - vocab_start).clamp(0, probs.shape[1] - 1)
            probs.scatter_add_(1, local_t[:, None], in_shard[:, None].to(probs.dtype).neg())
            g = probs.mul_(grad_losses[s:e, None]).to(weight.dtype)
            del probs
            if grad_hidden is not None:
                grad_hidden[s:e] = (g @ weight).to(hidden.dtype)
            if wgrad_acc is not None:
                accumulate_matmul(wgrad_acc, g.t(), h.to(weight.dtype))
            del g  # before the next chunk's GEMM allocates its buffer
        grad_weight = None
        if main_grad is not None:
            weight.grad_added_to_main_grad = True
            # Dummy gradient (see the module doc); zeros where DDP's hook adds it anyway (an output
            # layer sharing the embedding's weight on the same stage).
            make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
            grad_weight = make(weight.shape, dtype=weight.dtype, device=weight.device)
        elif wgrad_acc is not None:
            grad_weight = wgrad_acc.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    chunk_tokens: int, tp_group=None, sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]`` (fp32) from final hidden states ``[s(/tp), b, h]``.

    ``weight``: the output layer's vocab-parallel shard ``[V/tp, h]``; ``tp_group``: megatron's TP
    group (None: no TP); ``sequence_parallel``: ``hidden`` is scattered along ``s`` over TP.
    """
    from megatron.core import tensor_parallel

    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    tp_world = dist.get_world_size(tp_group) if (tp_group is not None and dist.is_initialized()) else 1
    if sequence_parallel and tp_world > 1:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=tp_group)
    elif tp_world > 1:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states [s={s}, b={b}]")
    flat_h = hidden.reshape(s * b, h)
    flat_t = labels.transpose(0, 1).reshape(s * b)
    losses = _ChunkedVocabParallelCE.apply(flat_h, weight, flat_t, chunk_tokens,
                                           tp_group if tp_world > 1 else None)
    return losses.view(s, b).transpose(0, 1).contiguous()


def masked_loss_sum(losses: torch.Tensor, loss_mask: torch.Tensor):
    """``(sum of masked token losses, number of loss tokens)`` for ``calculate_per_token_loss``.

    Safe for a CP rank / micro-batch with every token masked: returns ``(0.0, 0)`` with a zero,
    finite gradient (no division here; megatron divides by the DP x CP all-reduced token count).
    Uses ``where`` rather than a product so a non-finite loss at a masked position cannot leak.
    """
    mask = loss_mask.reshape(-1).float()
    flat = losses.reshape(-1).float()
    total = torch.where(mask > 0, flat * mask, torch.zeros_like(flat)).sum()
    return total, mask.sum().detach().to(torch.int)
