"""Non-finite steps are skipped by every rank together and leave the run as if the batch had never
been trained on; too many in a row stop the run without touching the latest checkpoint.

What a skipped step does with the data: its global batch counts as consumed (the data position
moves on, as after an applied step); the weights, optimizer state and LR schedule stay as they
were. So after a NaN at step k, steps k+1... see the batches they would have seen anyway, from
the state after step k-1: exactly a run in which step k did nothing at all. That run is built
here without the skip code (the loop's ``train_step`` is replaced for step k by "nothing
happens"), and the losses must match *exactly*: the steps before k show that two runs of this
fp32 CPU setup are bitwise identical, so the only tolerance fp32 determinism allows is zero.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

BASE = ["model.name=llama3-debug", "data.mock=true", "train.device=cpu", "train.seq_length=32",
        "train.micro_batch_size=1", "train.global_batch_size=4", "optim.lr=3e-3", "optim.warmup_ratio=0.0",
        "logging.interval=100"]


def _state(model, optimizer, scheduler) -> dict:
    import torch

    out = {f"param {n}": p.detach().clone() for n, p in model[0].module.named_parameters()}
    for i, sub in enumerate(optimizer.chained_optimizers):
        for g, group in enumerate(sub.optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                out[f"main {i}.{g}.{j}"] = p.detach().clone()
        for j, st in enumerate(sub.optimizer.state.values()):
            out.update({f"state {i}.{j}.{k}": v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    out["scheduler steps"] = torch.tensor(scheduler.num_steps)
    out["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return out


def _skip_leaves_state_alone(precision: str, device: str = "cpu"):
    """Two good steps, a step whose batch is poisoned on the last rank only, then a good step."""
    import torch

    from megatron_prolong.config import load_config
    from megatron_prolong.data import build_train_dataset
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import faults
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer, build_scheduler
    from megatron_prolong.training.step import any_rank, train_step
    from megatron_prolong.training.trainer import step_batches

    cfg = load_config(None, [o for o in BASE if o != "train.device=cpu"] + [f"train.precision={precision}",
                                                                          f"train.device={device}"])
    run = resolve_run(cfg)
    model = build_model(cfg, run)
    optimizer = build_optimizer(cfg, run, model)
    scheduler = build_scheduler(cfg, optimizer)
    t = cfg.train
    dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed, vocab_size=run.spec.vocab_size,
                                  num_samples=t.steps * t.global_batch_size)
    os.environ[faults.ENV] = f"nan@3:{run.dp_size - 1}"

    def step(k):
        batches = faults.inject(k, step_batches(cfg, run, dataset, (k - 1) * t.global_batch_size, None))
        return train_step(model, optimizer, scheduler, batches, num_microbatches=4 // run.dp_size,
                          seq_length=t.seq_length,
                          micro_batch_size=1, global_batch_size=t.global_batch_size, device=run.device)

    outs = [step(1), step(2)]
    before = _state(model, optimizer, scheduler)
    outs.append(step(3))
    after = _state(model, optimizer, scheduler)
    outs.append(step(4))
    changed_by_step_4 = [k for k, v in _state(model, optimizer, scheduler).items() if not torch.equal(v, after[k])]
    decisions = (any_rank(run.dp_rank == run.dp_size - 1, run.device), any_rank(False, run.device))
    destroy()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    return [(o.skipped, o.skip_reason, o.loss) for o in outs], len(before), unchanged, changed_by_step_4, decisions


@pytest.mark.parametrize("precision, device, ranks", [
    ("fp32", "cpu", 2), ("bf16", "cpu", 2), pytest.param("bf16", "cuda", 1, marks=pytest.mark.gpu)])
def test_skipped_step_leaves_weights_optimizer_and_schedule_untouched(precision, device, ranks):
    """bf16 is the GPU setting: megatron has no fp16-style loss scaler there and would apply NaNs."""
    results = run_distributed(_skip_leaves_state_alone, ranks, (precision, device))
    for steps, n_state, unchanged, changed, decisions in results:
        assert [s[0] for s in steps] == [False, False, True, False]
        assert steps[2][1] == "non-finite loss (nan)" and math.isnan(steps[2][2])
        assert n_state > 20 and len(unchanged) == n_state  # params, fp32 main params, Adam moments/steps, LR
        assert any(k.startswith("param") for k in changed)  # the next step does apply
        assert "scheduler steps" in changed
        assert decisions == (True, False)  # one rank's flag decides for all


def _train_three_ways(save_dir: str):
    """Clean; poisoned at step 3 on rank 1; step 3 replaced by nothing. One process group."""
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import faults, trainer
    from megatron_prolong.training.step import StepResult

    cfg = load_config(None, BASE + ["train.steps=5"])
    clean = trainer.train(cfg)
    os.environ[faults.ENV] = "nan@3:1"
    poisoned = trainer.train(cfg)
    del os.environ[faults.ENV]

    real_step, calls = trainer.train_step, []

    def nothing_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            return StepResult(loss=math.nan, loss_tokens=0, grad_norm=math.nan, lr=math.nan, skipped=True,
                              skip_reason="not run")
        return real_step(*args, **kwargs)

    trainer.train_step = nothing_at_step_3
    try:
        never_saw = trainer.train(cfg)
    finally:
        trainer.train_step = real_step
    destroy()
    return clean.losses, poisoned.losses, never_saw.losses


def test_skipped_batch_is_consumed_like_a_run_that_never_trained_on_it(tmp_path):
    for clean, poisoned, never_saw in run_distributed(_train_three_ways, 2, (str(tmp_path),)):
        assert [poisoned[s] for s in (1, 2)] == [clean[s] for s in (1, 2)]  # bitwise: the runs are deterministic
        assert math.isnan(poisoned[3])
        assert [poisoned[s] for s in (4, 5)] == [never_saw[s] for s in (4, 5)]  # exact, see the module doc
        assert poisoned[4] != clean[4]  # and the comparison can tell: batch 3 matters


def _bad_streak(save_dir: str):
    from megatron_prolong.config import load_config
    from megatron_prolong.errors import TrainingStopped
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import faults, trainer
    from megatron_prolong.training.checkpoint import latest_iteration, list_iterations, list_partials

    cfg = load_config(None, BASE + ["train.steps=8", f"checkpoint.save_dir={save_dir}", "checkpoint.save_interval=2",
                                    "checkpoint.keep_last=1", "train.max_bad_steps=3"])
    os.environ[faults.ENV] = "nan@5,nan@6,nan@7"
    try:
        trainer.train(cfg)
        message = None
    except TrainingStopped as e:
        message = str(e)
    del os.environ[faults.ENV]
    after_stop = (latest_iteration(save_dir), list_iterations(save_dir), [p.name for p in list_partials(save_dir)])
    resumed = trainer.train(cfg)  # the batches are fine now: the relaunch trains on from step 4
    destroy()
    return message, after_stop, sorted(resumed.losses), latest_iteration(save_dir)


def test_too_many_bad_steps_stop_the_run_and_keep_the_latest_good_checkpoint(tmp_path):
    for message, after_stop, resumed_steps, final in run_distributed(_bad_streak, 2, (str(tmp_path),)):
        assert message is not None and "training stopped at step 7" in message and "steps 5-7" in message
        assert "latest checkpoint is still iteration 4" in message
        # The save due at step 6 was deferred (skipped step), so keep_last=1 did not push out 4.
        assert after_stop == (4, [4], [])
        assert resumed_steps == [5, 6, 7, 8] and final == 8


def _guarded_vs_megatron_step(precision: str):
    import torch

    from megatron_prolong.config import load_config
    from megatron_prolong.data import build_train_dataset
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import step as step_mod
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer, build_scheduler
    from megatron_prolong.training.trainer import step_batches

    def three_steps(guarded: bool):
        cfg = load_config(None, BASE + [f"train.precision={precision}", "optim.clip_grad=0.5"])  # clipping active
        run = resolve_run(cfg)
        model = build_model(cfg, run)
        optimizer = build_optimizer(cfg, run, model)
        scheduler = build_scheduler(cfg, optimizer)
        t = cfg.train
        dataset = build_train_dataset(cfg.data, seq_length=t.seq_length, seed=t.seed,
                                      vocab_size=run.spec.vocab_size, num_samples=12)
        real = step_mod.guarded_optimizer_step
        if not guarded:  # megatron's own step, as the trainer called it before the guard
            step_mod.guarded_optimizer_step = lambda opt, loss, device: (float(opt.step()[1]), None)
        try:
            norms = [step_mod.train_step(model, optimizer, scheduler, step_batches(cfg, run, dataset, 4 * k, None),
                                         num_microbatches=4, seq_length=t.seq_length, micro_batch_size=1,
                                         global_batch_size=4, device=run.device).grad_norm for k in range(3)]
        finally:
            step_mod.guarded_optimizer_step = real
        params = [p.detach().clone() for p in model[0].module.parameters()]
        destroy()
        return norms, params

    (norms_a, params_a), (norms_b, params_b) = three_steps(False), three_steps(True)
    return norms_a, norms_b, all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_applied_step_is_megatrons_optimizer_step_bitwise(precision):
    norms_megatron, norms_guarded, same_params = run_distributed(_guarded_vs_megatron_step, 1, (precision,))[0]
    assert min(norms_megatron) > 0.5  # the clip acts
    assert norms_guarded == norms_megatron and same_params
