"""The retrieval harness on a case whose answer is known: a tiny model trained here (200 CPU
steps, about 30 s) on synthetic key-value needles retrieves at its trained context, well above
chance, and the same harness reports chance for the same model untrained."""

from __future__ import annotations

import math

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed  # one spawned rank: keeps the CPU platform out of pytest's process

SEQ = 64


def _train_and_score(root: str):
    from megatron_prolong.eval.known_answer import score_retrieval, train_known_answer_model
    from megatron_prolong.parallel import destroy

    try:
        run = train_known_answer_model(root, steps=200, seq_length=SEQ)
        return run, {name: score_retrieval(path, lengths=[SEQ])
                     for name, path in (("untrained", run.untrained), ("trained", run.trained))}
    finally:
        destroy()


def test_trained_model_retrieves_untrained_is_at_chance(tmp_path):
    run, scores = run_distributed(_train_and_score, 1, (str(tmp_path),))[0]
    assert run.losses[0] > 0.8 * math.log(run.span) > 3 * run.losses[-1]  # it learned (from ~ln 16)
    trained, untrained = scores["trained"], scores["untrained"]
    assert trained["chance"] == pytest.approx(1 / run.span) and trained["cases"] == 80
    metric = lambda res, m: res["by_length"][m][str(SEQ)]  # noqa: E731
    assert metric(trained, "exact_match") >= 0.7 and metric(trained, "choice_accuracy") >= 0.7
    # Untrained: chance, 1/16 expected over 80 cases; 0.2 is more than 4 standard deviations above.
    assert metric(untrained, "choice_accuracy") <= 0.2 and metric(untrained, "exact_match") <= 0.2
    assert metric(trained, "answer_logprob") > metric(untrained, "answer_logprob") + 1.0
