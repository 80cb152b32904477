"""TP=2, PP=2, DP=2 and CP=2 train exactly like one rank; a pre-empted run resumes exactly.

Every run starts from the same model-only checkpoint (written once by a single rank and
resharded on load), trains on the same mock global batches, and is compared step by step.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 3
BASE = [
    "model.name=llama3-debug", "model.rotary_base=8e6", "data.mock=true", "train.device=cpu",
    f"train.steps={STEPS}", "train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
    "optim.lr=3e-3", "optim.warmup_ratio=0.0", "logging.interval=100",
]


def _write_initial_weights(path: str):
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.checkpoint import save_checkpoint
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model

    cfg = load_config(None, BASE + ["train.seed=7"])
    run = resolve_run(cfg)
    save_checkpoint(path, 0, build_model(cfg, run), model_spec=run.spec)
    destroy()


def _train(overrides: list[str], preempt_after: int | None = None):
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer

    if preempt_after is not None:
        real_step = trainer.train_step
        calls = []

        def step_then_signal(*args, **kwargs):
            out = real_step(*args, **kwargs)
            calls.append(1)
            # Only rank 0 is signalled, as when Slurm reaches one node first: all ranks must agree.
            if len(calls) == preempt_after and int(os.environ["RANK"]) == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out

        trainer.train_step = step_then_signal
    try:
        result = trainer.train(load_config(None, BASE + overrides))
    finally:
        destroy()
    return result


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init"))
    run_distributed(_write_initial_weights, 1, (path,))
    return path


@pytest.fixture(scope="module")
def reference(init_ckpt):
    return run_distributed(_train, 1, ([f"checkpoint.init_from={init_ckpt}"],))[0]


def _assert_same_curve(result, reference, rtol=2e-5):
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    for step, loss in reference.losses.items():
        assert result.losses[step] == pytest.approx(loss, rel=rtol), f"step {step}"


def test_reference_learns(reference):
    losses = [reference.losses[s] for s in sorted(reference.losses)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", [
    ["parallel.tensor=2"],
    ["parallel.pipeline=2"],
    [],  # two ranks, data parallel
    ["parallel.tensor=2", "parallel.sequence_parallel=true"],
    ["parallel.context=2"],
    ["parallel.context=2", "model.loss_chunk_tokens=8", "train.recompute=full"],
], ids=["tp2", "pp2", "dp2", "tp2-sp", "cp2", "cp2-chunked-ce-recompute"])
def test_parallel_layout_matches_single_rank(layout, init_ckpt, reference):
    results = run_distributed(_train, 2, ([f"checkpoint.init_from={init_ckpt}"] + layout,))
    for result in results:  # every rank reports the same global loss
        _assert_same_curve(result, reference)


def test_pipeline_and_context_parallel_together(init_ckpt, reference):
    # Pipeline stages exchange activations of the CP-local length: shapes must agree with CP.
    results = run_distributed(_train, 4, ([f"checkpoint.init_from={init_ckpt}", "parallel.pipeline=2",
                                           "parallel.context=2"],))
    for result in results:
        _assert_same_curve(result, reference)


def test_preempted_run_resumes_exactly(init_ckpt, reference, tmp_path):
    save = [f"checkpoint.init_from={init_ckpt}", f"checkpoint.save_dir={tmp_path}", "parallel.tensor=2"]
    first = run_distributed(_train, 2, (save, 2))
    assert all(r.interrupted and r.iteration == 2 for r in first)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    second = run_distributed(_train, 2, (save,))
    assert sorted(second[0].losses) == [3]
    # The resumed step equals the uninterrupted run's (optimizer, schedule, data position restored).
    assert second[0].losses[3] == pytest.approx(reference.losses[3], rel=2e-5)
    assert first[0].losses[1] == pytest.approx(reference.losses[1], rel=2e-5)


def test_dp_reshardable_optimizer_state_resumes_exactly(init_ckpt, reference, tmp_path):
    save = [f"checkpoint.init_from={init_ckpt}", f"checkpoint.save_dir={tmp_path}",
            "checkpoint.optimizer_format=dp_reshardable"]  # two ranks: data parallel
    first = run_distributed(_train, 2, (save + ["train.exit_at_step=2"],))
    assert all(r.interrupted and r.iteration == 2 for r in first)
    second = run_distributed(_train, 2, (save,))
    assert second[0].losses[3] == pytest.approx(reference.losses[3], rel=2e-5)
