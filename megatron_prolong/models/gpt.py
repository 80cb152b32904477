"""The project's GPTModel: megatron-core's, with a memory-bounded (chunked) loss head."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class ProLongGPTModel(GPTModel):
    """megatron-core GPTModel; ``forward(labels=...)`` returns per-token losses ``[b, s]``.

    ``loss_chunk_tokens`` (constructor kwarg or attribute, default 0): when > 0 and labels are
    given, the output layer + cross-entropy run in chunks of that many tokens through
    ``megatron_prolong.parallel.cross_entropy.chunked_lm_loss`` and the full ``[tokens, vocab]``
    logits are never materialised (ProLong: 2,048-token blocks). 0 = megatron's default path.
    Without labels (inference / logits) megatron's path is always used.
    """

    def __init__(self, *args, loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0, got {loss_chunk_tokens}")
        self.loss_chunk_tokens = int(loss_chunk_tokens)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, **kwargs):
        """megatron's, with RoPE at the tokens' own positions under portable context parallelism:
        megatron slices the RoPE table by its zigzag, but ``prepare_batch`` splits every sample by
        its documents, so each token is rotated by its ``position_ids`` entry (its position in the
        sample, as at CP=1; TE's THD path keeps megatron's per-document RoPE)."""
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params, **kwargs)
        if self.config.context_parallel_size == 1 or packed_seq_params is not None or out[1] is None \
                or self.position_embedding_type != "rope":
            return out
        if position_ids is None:
            raise ValueError("context parallelism on the portable attention needs position_ids (prepare_batch's)")
        return (out[0], rope_at_positions(self.rotary_pos_emb, position_ids)) + tuple(out[2:])

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        inference_context = kwargs.get("inference_context")
        use_chunked = (
            self.post_process
            and labels is not None
            and getattr(self, "loss_chunk_tokens", 0) > 0
            and not kwargs.get("mtp_in_postprocess")
            and self.config.mtp_num_layers is None
            and (inference_context is None or self.training)
        )
        if not use_chunked:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        from ..parallel.cross_entropy import chunked_lm_loss

        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return chunked_lm_loss(
            hidden_states, weight, labels, chunk_tokens=self.loss_chunk_tokens,
            tp_group=self.pg_collection.tp, sequence_parallel=self.output_layer.sequence_parallel,
        )


def rope_at_positions(rotary, positions: torch.Tensor) -> torch.Tensor:
    """``RotaryEmbedding``'s table rows at ``positions`` ``[b, s]``, as ``[s, b, 1, dim]`` (megatron
    builds them for ``0..n-1`` only; the same arithmetic, so equal positions give equal rows)."""
    inv_freq = rotary.inv_freq.to(positions.device)
    seq = positions.t().to(inv_freq.dtype)
    if rotary.seq_len_interpolation_factor is not None:
        seq = seq * (1 / rotary.seq_len_interpolation_factor)
    freqs = seq[..., None] * inv_freq
    if rotary.rotary_interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, :, None, :]

