"""Per-micro-batch post-processing for the model: context-parallel split and attention inputs.

``prepare_batch`` turns a collated batch (``megatron_prolong.data.batch``) into what this rank's
GPTModel forward takes.
"""

from __future__ import annotations

import torch


def prepare_batch(batch: dict[str, torch.Tensor], *, cp_size: int = 1, cp_rank: int = 0,
                  use_te: bool = False) -> dict:
    """Returns ``tokens, labels, loss_mask, position_ids, attention_mask, packed_seq_params``.

    ``attention_mask`` carries the document ids of the full sequence (portable attention).
    """
    if cp_size != 1 or use_te:
        raise NotImplementedError("context parallelism / TE packed sequences are not wired yet")
    tokens = batch["tokens"]
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": batch["labels"],
        "loss_mask": batch["loss_mask"],
        "position_ids": torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s),
        "attention_mask": batch.get("doc_ids"),
        "packed_seq_params": None,
    }
