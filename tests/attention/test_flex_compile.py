"""flex_attention is compiled so that lengths do not each recompile, and it never runs uncompiled
(eager flex materialises the whole score matrix): past dynamo's recompile limit it raises.

On CPU the compilations are counted with dynamo's ``CompileCounter`` backend (dynamo traces and
guards as for inductor, then runs the graph eagerly; forward only, CPU flex has no backward);
the ``gpu`` test counts inductor's graphs on CUDA, forward and backward, at four lengths.
"""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.attention import flex

LENGTHS = (128, 256, 384)


@pytest.fixture
def fresh_dynamo(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(flex, "_COMPILED", {})
    yield
    torch._dynamo.reset()


def _attend(s, device="cpu", grad=False):
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(1, h, s, 16, generator=g).to(device).requires_grad_(grad) for h in (4, 2, 2))
    pos = torch.arange(s, device=device)
    block_mask = flex.document_block_mask(pos, pos, (pos // 100)[None])
    out = flex.flex_document_attention(q, k, v, block_mask, 0.25)
    if grad:
        out.sum().backward()
    return out


def test_lengths_do_not_each_recompile(fresh_dynamo, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(flex, "COMPILE_BACKEND", counter)
    for s in LENGTHS:
        _attend(s)
    # the first length static, the second makes the lengths dynamic, the others reuse that
    assert counter.frame_count <= 2, counter.frame_count


def test_recompile_limit_raises_instead_of_running_eager(fresh_dynamo, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(flex, "COMPILE_BACKEND", CompileCounter())
    with torch._dynamo.config.patch(recompile_limit=1):
        _attend(128)
        with pytest.raises(flex.FlexRecompileError, match="recompile_limit"):
            _attend(256)


@pytest.mark.gpu
def test_inductor_compiles_flex_at_most_twice_over_lengths(fresh_dynamo, monkeypatch):
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor(gm, example_inputs):  # inductor, counting the graphs dynamo hands it
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    monkeypatch.setattr(flex, "COMPILE_BACKEND", inductor)
    for s in (1024, 2048, 3072, 4096):
        _attend(s, device="cuda", grad=True)
    assert 1 <= len(graphs) <= 2, len(graphs)
