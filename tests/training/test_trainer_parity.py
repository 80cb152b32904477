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


@pytest.mark.parametrize("save_layout, resume_layout, resume_ranks", [
    ([], ["parallel.tensor=2"], 2),  # DP 2 -> TP 2
    (["parallel.tensor=2"], [], 1),  # TP 2 -> one rank
], ids=["dp2-to-tp2", "tp2-to-single"])
def test_parallel_reshardable_optimizer_state_resumes_at_another_layout(init_ckpt, reference, tmp_path,
                                                                        save_layout, resume_layout, resume_ranks):
    """The default optimizer format (each data-parallel rank writes its share of every parameter's
    Adam state, in parallel) resumes exactly at a different TP / DP layout. Saved after step 1, so
    step 2's update uses the restored Adam moments and step 3's loss shows whether they were right."""
    base = [f"checkpoint.init_from={init_ckpt}", f"checkpoint.save_dir={tmp_path}"]
    first = run_distributed(_train, 2, (base + save_layout + ["train.exit_at_step=1"],))
    assert all(r.interrupted and r.iteration == 1 for r in first)
    meta = (tmp_path / "iter_0000001" / "prolong_meta.json").read_text()
    assert '"optimizer_format": "parallel_reshardable"' in meta
    if not save_layout:  # DP 2: both ranks write (weights are DP replicas: rank 0 writes them)
        written = {0: 0, 1: 0}  # bytes per writing rank: files are __{rank}_{thread}.distcp
        for f in (tmp_path / "iter_0000001").glob("__*_*.distcp"):
            written[int(f.name[2:].split("_")[0])] += f.stat().st_size
        assert min(written.values()) > 0.3 * max(written.values()), written
    second = run_distributed(_train, resume_ranks, (base + resume_layout,))
    assert sorted(second[0].losses) == [2, 3]
    for step in (2, 3):
        assert second[0].losses[step] == pytest.approx(reference.losses[step], rel=2e-5), step
