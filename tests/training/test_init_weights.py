"""``checkpoint.init_from`` must reach the optimizer's fp32 main weights, not only the model.

With bf16 parameters the distributed optimizer keeps fp32 main copies taken when it is built;
weights loaded afterwards must be copied into them, or the first optimizer step writes the
random initialisation back into the model. (With fp32 parameters the main weights are views of
the model's, which is why a CPU run in fp32 cannot show this.)
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.distributed

BASE = ["model.name=llama3-debug", "data.mock=true", "train.device=cpu", "train.precision=bf16",
        "train.seq_length=32", "train.global_batch_size=2"]


def _main_weights_after_init_from(init_dir: str):
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.checkpoint import Checkpointer, save_checkpoint
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer

    cfg = load_config(None, BASE + ["train.seed=1"])
    run = resolve_run(cfg)
    source = build_model(cfg, run)
    save_checkpoint(init_dir, 0, source, model_spec=run.spec)  # the weights to start from
    reference = {n: t.detach().clone() for n, t in source[0].module.state_dict().items() if "extra_state" not in n}

    cfg = load_config(None, BASE + ["train.seed=2", f"checkpoint.init_from={init_dir}"])  # another random init
    run = resolve_run(cfg)
    model = build_model(cfg, run)
    optimizer = build_optimizer(cfg, run, model)
    Checkpointer(cfg, run, model, optimizer, scheduler=None).restore()
    for sub in optimizer.chained_optimizers:  # what every optimizer step ends with
        sub._copy_main_params_to_model_params()
    after = model[0].module.state_dict()
    mismatched = [n for n, t in reference.items() if not torch.equal(after[n], t)]
    destroy()
    return len(reference), mismatched


def test_init_from_sets_the_optimizer_main_weights(tmp_path):
    checked, mismatched = run_distributed(_main_weights_after_init_from, 1, (str(tmp_path),))[0]
    assert checked > 10
    assert mismatched == []
