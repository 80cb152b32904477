"""Core-attention backends: the portable torch one (document masks, context parallelism) and TE.

Light: the names below are what ``model.attention_backend`` accepts (checked by the config before
torch or megatron-core load); the kernels live in ``portable.py``.
"""

ATTENTION_BACKENDS = ("auto", "flex", "sdpa")
"""Kernels of the portable attention. ``auto``: the fastest available on the run's device (CUDA:
``flex``; CPU: ``sdpa``, as flex_attention has no CPU backward)."""
