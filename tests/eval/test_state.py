"""Evaluation inside training restores every generator the training step draws from."""

from __future__ import annotations

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed  # a spawned rank: the CPU platform shims stay out of pytest


def _draws_after(evaluate_first: bool):
    import torch
    from megatron.core import tensor_parallel

    from megatron_prolong.eval.state import evaluation_mode
    from megatron_prolong.platform import init_platform, seed_model_parallel_rng

    init_platform("cpu")
    seed_model_parallel_rng(5)
    model = [torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)]
    model[1].eval()  # a chunk that was in eval mode stays so
    seen = None
    if evaluate_first:
        with evaluation_mode(model):
            seen = ([m.training for m in model], torch.is_grad_enabled())
            torch.rand(100)  # what a forward with dropout would consume
            with tensor_parallel.get_cuda_rng_tracker().fork():
                torch.rand(100)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        forked = torch.rand(3)
    return torch.rand(3), forked, [m.training for m in model], torch.is_grad_enabled(), seen


def _with_and_without_evaluation():
    return _draws_after(False), _draws_after(True)  # each starts from the same seeds


def test_evaluation_mode_restores_rng_modes_and_grad():
    ((plain, evaluated),) = run_distributed(_with_and_without_evaluation, 1)
    assert evaluated[4] == ([False, False], False)  # inside: eval mode, no autograd
    assert evaluated[2:4] == plain[2:4] == ([True, False], True)
    assert plain[0].tolist() == evaluated[0].tolist()  # torch's generator as if nothing ran
    assert plain[1].tolist() == evaluated[1].tolist()  # megatron's model-parallel tracker too
