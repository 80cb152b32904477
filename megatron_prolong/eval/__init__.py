"""Evaluation with the training model: validation loss during training, and long-context
evaluation of checkpoints (perplexity by position, needle retrieval) at any TP/PP/CP.

- ``engine.ForwardScorer``: forward-only scoring through the trainer's schedule, CP split and loss;
- ``periodic``: the trainer's validation (``eval.interval``, ``data.valid_blend``);
- ``needle`` / ``haystack`` / ``perplexity``: the long-context tasks; ``runner``: ``tools/evaluate.py``;
- ``state.evaluation_mode``: evaluation that leaves the training RNG and modes untouched.

Submodules import megatron-core; this package itself is light.
"""
