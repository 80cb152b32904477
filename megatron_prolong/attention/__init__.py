"""Core-attention backends: the portable torch one (document masks, context parallelism) and TE.

Light: the names below are what ``model.attention_backend`` accepts (checked by the config before
torch or megatron-core load); the kernels live in ``portable.py`` (dispatch, SDPA), ``flex.py``
and ``varlen.py``; ``backends.py`` says which of them can run here.
"""

ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "varlen", "fa4")
"""Kernels of the portable attention.

- ``auto``: CUDA -> ``flex``, CPU -> ``sdpa``. It stays ``flex`` on CUDA until the kernels have
  been timed against each other on a GPU (``benchmarks/bench_attention.py``); none has been yet.
- ``flex``: ``torch.nn.attention.flex_attention`` (compiled) with a block-sparse document mask.
  CUDA only (flex_attention has no CPU backward).
- ``sdpa``: ``scaled_dot_product_attention`` with a dense boolean mask (``S_local x S`` bytes per
  sample: the CPU path; on GPUs only for short sequences or attention dropout).
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.11, FlashAttention-2 class),
  documents as ``cu_seqlens``. CUDA, bf16/fp16.
- ``fa4``: FlashAttention-4 (``pip install flash-attn-4``, module ``flash_attn.cute``), varlen
  with ``cu_seqlens``. Hopper/Blackwell, bf16/fp16.
"""
