"""Portable core attention: causal attention within documents, in plain torch.

Drop-in for megatron-core's ``DotProductAttention`` in the local layer spec. The
``attention_mask`` argument of ``forward`` carries *document ids* rather than a boolean mask:
an integer tensor ``[b, s]`` giving, for every token of the (full, un-split) sequence, the index
of the document it belongs to. ``None`` means one document per sample (plain causal).
Queries attend to keys that are not in the future and belong to the same document.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class PortableCoreAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism in the portable attention is not wired yet")
        tp = 1
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp = parallel_state.get_tensor_model_parallel_world_size()
        head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("portable attention takes document ids, not packed_seq_params or a bias")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril_(sk - sq)
        if attention_mask is not None:
            doc = attention_mask.to(q.device)
            mask = mask & (doc[:, :, None] == doc[:, None, :])[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        # [b, h, s, d] -> [s, b, h*d]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
