"""A converted checkpoint, loaded by the trainer's loader at TP=1, TP=2 and PP=2, gives the same
logits as ``transformers`` on the same tokens (fp32), with a non-default RoPE theta, GQA and
Llama-3.1 RoPE scaling."""

from __future__ import annotations

import pytest
import torch

from megatron_prolong.convert import hf_to_megatron
from tests.dist import run_distributed

from ._helpers import LLAMA31_SCALING, hf_logits, make_hf_model

pytestmark = pytest.mark.distributed

SEQ = 64
TOKENS = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(3))


def megatron_logits(checkpoints: list[str], tp: int, pp: int, tokens: torch.Tensor) -> list[torch.Tensor | None]:
    """On each rank: load every checkpoint at TP x PP and return full-vocab logits (last stage)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prolong.models import build_gpt_model, build_transformer_config
    from megatron_prolong.parallel import initialize
    from megatron_prolong.training.checkpoint import load_checkpoint, model_spec_from_meta, read_checkpoint_meta

    initialize(tp, pp, 1, device="cpu")
    out = []
    for path in checkpoints:
        spec = model_spec_from_meta(read_checkpoint_meta(path))
        config = build_transformer_config(spec, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                          pipeline_dtype=torch.float32)
        model = build_gpt_model(spec, config, pre_process=parallel_state.is_pipeline_first_stage(),
                                post_process=parallel_state.is_pipeline_last_stage(), use_te=False)
        load_checkpoint(path, [model])
        model.eval()
        positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)

        def forward_step(data_iterator, m):
            batch = next(data_iterator)
            logits = m(batch, positions, None)
            return logits, lambda output, non_loss_data=False: output

        with torch.no_grad():
            collected = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
                seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
                collect_non_loss_data=True)
        if not parallel_state.is_pipeline_last_stage():
            out.append(None)
            continue
        local = collected[0]  # [b, s, vocab / tp]
        parts = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out.append(torch.cat(parts, dim=-1))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two HF models (plain, Llama-3.1 scaled RoPE), their HF logits and converted checkpoints."""
    root = tmp_path_factory.mktemp("parity")
    cases = []
    for name, extra in (("plain", {}), ("scaled", {"rope_scaling": LLAMA31_SCALING, "rope_theta": 1e4})):
        src = make_hf_model(root / f"hf_{name}", **extra)
        hf_to_megatron(src, root / f"meg_{name}", log=lambda _: None)
        cases.append((str(root / f"meg_{name}"), hf_logits(src, TOKENS)))
    # The scaling visibly changes the logits at this length, so matching them proves megatron applies it.
    unscaled = hf_logits(root / "hf_scaled", TOKENS, rope_scaling=None)
    assert (unscaled - cases[1][1]).abs().max() > 1e-2
    return cases


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_megatron_logits_match_transformers(converted, tp, pp):
    results = run_distributed(megatron_logits, tp * pp, ([c for c, _ in converted], tp, pp, TOKENS))
    last = results[-1]  # the last rank is on the last pipeline stage
    for (path, expected), got in zip(converted, last):
        assert got.shape == expected.shape
        # fp32; the two implementations differ only in summation order.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{path} TP={tp} PP={pp}: {m}")
