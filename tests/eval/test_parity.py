"""``tools/evaluate.py`` scores with the training path: its loss on a sample equals the loss the
trainer reports for that sample (same weights) at CP=1 and CP=2, and its position buckets and
retrieval scores do not depend on the layout (CP=2, TP=2, PP=2 equal one rank)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data._fixtures import write_indexed
from tests.dist import run_distributed

from ._helpers import write_initial_checkpoint

pytestmark = pytest.mark.distributed

SEQ = 64
TRAIN = ["model.name=llama3-debug", "model.rotary_base=8e6", "train.device=cpu", "train.steps=1",
         f"train.seq_length={SEQ}", "train.micro_batch_size=1", "train.global_batch_size=1", "optim.lr=1e-3",
         "logging.interval=100"]
EVAL = ["--lengths", str(SEQ), "--ppl-documents", "1", "--needle-task", "kv", "--depths", "0,0.5,1",
        "--samples-per-cell", "4", "--device", "cpu"]


def _train_one_step_then_evaluate(init: str, data: str, train_layout: list[str], eval_layouts: list[list[str]]):
    """The trainer's step-1 loss (the initial weights' loss on the only sample), then evaluate.py's
    results from the same weights at each layout; one process group throughout."""
    from megatron_prolong.config import load_config
    from megatron_prolong.eval import runner
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    try:
        result = trainer.train(load_config(None, TRAIN + train_layout + [
            f"checkpoint.init_from={init}", f"data.blend={{{data}: 1.0}}"]))
        evaluations = []
        for layout in eval_layouts:
            args = runner.build_parser().parse_args(
                ["--checkpoint", init, "--output", "unused", "--data", data] + EVAL + layout)
            evaluations.append(runner.evaluate(runner.check_request(args)))
    finally:
        destroy()
    return result.losses[1], evaluations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_parity")
    # One document of exactly SEQ + 1 tokens: the trainer's only sample and evaluate.py's only window.
    doc = np.random.default_rng(0).integers(0, 512, SEQ + 1)
    data = write_indexed(root / "doc", [doc])
    init = str(root / "init")
    run_distributed(write_initial_checkpoint, 1, (init, TRAIN + ["train.seed=11"]))
    return init, data


@pytest.fixture(scope="module")
def single(setup):
    return run_distributed(_train_one_step_then_evaluate, 1, (*setup, [], [[]]))[0]


def _ppl(evaluation):
    return evaluation["perplexity_by_position"]


def test_eval_loss_equals_training_loss_single_rank(single):
    train_loss, (ev,) = single
    assert _ppl(ev)["tokens"] == SEQ and _ppl(ev)["whole_documents"]
    assert _ppl(ev)["loss"] == pytest.approx(train_loss, rel=1e-6)
    # The buckets partition the tokens: their token-weighted mean is the overall loss.
    b = _ppl(ev)["buckets"]
    assert sum(x["tokens"] for x in b) == SEQ
    assert sum(x["loss"] * x["tokens"] for x in b) / SEQ == pytest.approx(train_loss, rel=1e-6)


def test_parallel_layouts_evaluate_alike(setup, single):
    train_loss, (reference,) = single
    results = run_distributed(_train_one_step_then_evaluate, 2, (*setup, ["parallel.context=2"],
                                                                 [["--cp", "2"], ["--tp", "2"], ["--pp", "2"]]))
    for cp_train_loss, (cp, tp, pp) in results:  # every rank returns the same numbers
        assert cp_train_loss == pytest.approx(train_loss, rel=2e-5)
        # At CP=2 the evaluation equals the CP=2 training step, as at CP=1.
        assert _ppl(cp)["loss"] == pytest.approx(cp_train_loss, rel=1e-6)
        for ev in (cp, tp, pp):
            assert _ppl(ev)["loss"] == pytest.approx(_ppl(reference)["loss"], rel=2e-5)
            for got, want in zip(_ppl(ev)["buckets"], _ppl(reference)["buckets"]):
                assert (got["start"], got["tokens"]) == (want["start"], want["tokens"])
                assert got["loss"] == pytest.approx(want["loss"], rel=2e-5)
            for got, want in zip(ev["retrieval"]["cells"], reference["retrieval"]["cells"]):
                assert (got["exact_match"], got["choice_accuracy"]) == (want["exact_match"], want["choice_accuracy"])
                assert got["answer_logprob"] == pytest.approx(want["answer_logprob"], rel=2e-5)


@pytest.mark.gpu
def test_eval_loss_equals_training_loss_on_gpu(setup):
    """The same on CUDA: bf16, flex_attention or TE's THD packing where TE is installed."""
    train_loss, (ev,) = run_distributed(_train_one_step_then_evaluate, 1,
                                        (*setup, ["train.device=cuda"], [["--device", "cuda"]]))[0]
    assert ev["device"] == "cuda" and ev["precision"] == "bf16"
    # Same kernels in the same precision; only the reduction order of the sums may differ.
    assert _ppl(ev)["loss"] == pytest.approx(train_loss, rel=1e-3)
