"""Analytic training FLOPs of a Llama-3 decoder: what MFU is measured against
(``benchmarks/bench_train.py``) and what the dry run's counted FLOPs are checked against.

Model FLOPs (recompute not counted; training = 3 x forward) per sample of ``S`` tokens, ``L``
layers, hidden ``h``, FFN ``f``, KV width ``kv``, ``H`` heads of ``d``, vocabulary ``V``::

    dense     = 3 * 2 * S * (L * (h*(h + 2*kv) + h*h + 3*h*f) + h*V)
    attention = 3 * 4 * d * H * L * pairs
    pairs     = sum over documents n*(n+1)/2   (document-masked: what the kernels must compute)
              = S*(S+1)/2                     (causal-dense: what published MFU figures count)
"""

from __future__ import annotations


def training_flops(spec, seq_length: int, samples: list[list[int]]) -> dict:
    """Model FLOPs of one pass (forward + backward) over ``samples`` (each a list of document
    lengths summing to ``seq_length``); see the module doc for the formula."""
    h, f, V, L = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size, spec.num_layers
    kv = spec.num_query_groups * spec.head_dim
    tokens = seq_length * len(samples)
    dense = 3 * 2 * tokens * (L * (h * (h + 2 * kv) + h * h + 3 * h * f) + h * V)
    per_pair = 3 * 4 * spec.head_dim * spec.num_attention_heads * L
    doc_pairs = sum(n * (n + 1) // 2 for docs in samples for n in docs)
    causal_pairs = len(samples) * seq_length * (seq_length + 1) // 2
    return {"tokens": tokens, "dense": dense, "doc_pairs": doc_pairs, "causal_pairs": causal_pairs,
            "doc": dense + per_pair * doc_pairs, "causal": dense + per_pair * causal_pairs}
