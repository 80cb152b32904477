"""Background checkpoint saves: the loop trains on while a forked writer writes; the checkpoint
becomes complete (renamed, ``latest``) only once every rank's writer finished; a stop waits for a
pending save; and what is written is the state of the step that was saved, not of later steps."""

from __future__ import annotations

import os

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

# dp_reshardable: its Adam moments reach the writer as the live tensors (the fully_reshardable
# format gathers copies, and the weights are views into DDP's buffer, which megatron clones while
# planning), so only the writer's own snapshot (a fork) keeps later steps out of the checkpoint.
BASE = ["model.name=llama3-debug", "data.mock=true", "train.device=cpu", "train.seq_length=32",
        "train.micro_batch_size=1", "train.global_batch_size=4", "optim.lr=3e-3", "optim.warmup_ratio=0.0",
        "logging.interval=100", "parallel.tensor=2", "train.steps=6", "checkpoint.optimizer_format=dp_reshardable"]


def _read_all(folder):
    """Every record of a checkpoint folder: tensors loaded, objects as raw bytes."""
    import io

    import torch

    from megatron_prolong.training.checkpoint_integrity import read_index

    out = {}
    for idx, info in read_index(folder).storage_data.items():
        with open(os.path.join(folder, info.relative_path), "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            out[(idx.fqn, tuple(idx.offset or ()))] = torch.load(io.BytesIO(data), weights_only=True)
        except Exception:
            out[(idx.fqn, None)] = data  # objects (RNG states, extra state): compared as bytes
    return out


def _background_then_sync(root: str, base: list[str] = BASE, slow: str = "slow_save@2:1=4,slow_save@4=2"):
    import torch

    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import faults, trainer
    from megatron_prolong.training.checkpoint import iteration_dir, latest_iteration

    background, sync = os.path.join(root, "background"), os.path.join(root, "sync")
    seen = []  # (step about to run, iter_2 complete?, .partial present?) on this rank
    real_step = trainer.train_step

    def observing_step(*args, **kwargs):
        step = len(seen) + 1
        seen.append((step, iteration_dir(background, 2).is_dir(),
                     os.path.isdir(os.path.join(background, ".iter_0000002.partial"))))
        return real_step(*args, **kwargs)

    # Rank 1's writer of step 2 starts 4 s late; the writers of step 4 start 2 s late, so that
    # save is still pending when exit_at_step=5 forces a (synchronous) save.
    os.environ[faults.ENV] = slow
    trainer.train_step = observing_step
    try:
        first = trainer.train(load_config(None, base + [f"checkpoint.save_dir={background}", "checkpoint.save_interval=2",
                                                        "train.exit_at_step=5"]))
    finally:
        trainer.train_step = real_step
        del os.environ[faults.ENV]
    state = (latest_iteration(background), sorted(p.name for p in os.scandir(background)))
    trainer.train(load_config(None, base + [f"checkpoint.save_dir={sync}", "checkpoint.async_save=false",
                                            "train.exit_at_step=2"]))
    destroy()
    a, b = _read_all(iteration_dir(background, 2)), _read_all(iteration_dir(sync, 2))
    differ = [k for k in a if k not in b or (torch.is_tensor(a[k]) and not torch.equal(a[k], b[k]))]
    return seen, state, first.losses, len(a), differ


def test_background_save_completes_after_every_rank_and_holds_the_saved_step(tmp_path):
    results = run_distributed(_background_then_sync, 2, (str(tmp_path),))
    for seen, (latest, names), losses, n_items, differ in results:
        assert sorted(losses) == [1, 2, 3, 4, 5]
        # Steps 3 and 4 ran while step 2's save was being written: rank 0's writer was done, but
        # the save was not complete until rank 1's had written too.
        assert seen[2] == (3, False, True) and seen[3] == (4, False, True)
        assert seen[4][1]  # complete before step 5 (the save of step 4 waited for it)
        # The stop at step 5 waited for the pending save of step 4, then saved step 5.
        assert latest == 5 and names == ["iter_0000002", "iter_0000004", "iter_0000005",
                                         "latest_checkpointed_iteration.txt"]
        # Written while steps 3-4 changed the weights, the background checkpoint holds step 2's
        # state exactly: the same bytes as a synchronous save of step 2.
        assert n_items > 50 and differ == []


@pytest.mark.gpu
def test_background_save_on_cuda_holds_the_saved_step(tmp_path):
    """On a GPU the writer gets host copies staged by megatron's ``preload_fn`` before the fork
    (bf16 weights, fp32 main weights and moments); one rank, all writers slow."""
    base = [o for o in BASE if o not in ("train.device=cpu", "parallel.tensor=2")] + ["train.device=cuda"]
    seen, (latest, names), losses, n_items, differ = run_distributed(
        _background_then_sync, 1, (str(tmp_path), base, "slow_save@2=4,slow_save@4=2"))[0]
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert seen[2] == (3, False, True)
    assert latest == 5 and "iter_0000002" in names and "iter_0000004" in names
    assert n_items > 20 and differ == []
