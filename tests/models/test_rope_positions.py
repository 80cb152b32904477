"""RoPE under portable context parallelism follows the tokens: ``rope_at_positions`` gives, for
any positions, exactly the rows megatron's ``RotaryEmbedding`` table has for them."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_prolong.models.gpt import rope_at_positions


@pytest.mark.parametrize("kw", [
    dict(rotary_base=8e6),
    dict(rotary_base=1.28e8, rope_scaling=True),  # the 512K recipe (Llama-3.1 scaling)
    dict(rotary_base=1e4, rotary_interleaved=True, seq_len_interpolation_factor=4.0),
], ids=["64k", "512k-llama31", "interleaved-interpolated"])
def test_rows_at_positions_equal_megatrons_table(kw, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # get_emb moves inv_freq there
    rope = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, use_cpu_initialization=True, **kw)
    table = rope.get_emb(4096)  # [S, 1, 1, dim]
    positions = torch.stack([torch.randperm(4096)[:300], torch.arange(3796, 4096)])  # [b, s]
    got = rope_at_positions(rope, positions)
    assert got.shape == (300, 2, 1, 64)
    for b in range(2):
        assert torch.equal(got[:, b, 0], table[positions[b], 0, 0])  # bit for bit
