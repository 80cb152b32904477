"""The project's GPTModel: megatron-core's, with a memory-bounded (chunked) loss head."""

from __future__ import annotations

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
