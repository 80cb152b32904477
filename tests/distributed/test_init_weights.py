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
    from megatron_prolong.parallel import destroy, initialize
    from megatron_prolong.training.checkpoint import save_checkpoint
    from megatron_prolong.training.setup import build_model, build_optimizer
    from megatron_prolong.training.trainer import restore

    initialize(device="cpu", seed=1)
    cfg = load_config(None, BASE)
    spec = cfg.model.spec()
    source = build_model(cfg, spec)
    save_checkpoint(init_dir, 0, source, model_spec=spec)  # the weights to start from
    reference = {n: t.detach().clone() for n, t in source[0].module.state_dict().items() if "extra_state" not in n}

    initialize(device="cpu", seed=2)  # a different random initialisation
    cfg = load_config(None, BASE + [f"checkpoint.init_from={init_dir}"])
    model = build_model(cfg, spec)
    optimizer = build_optimizer(cfg, model)
    restore(cfg, model, optimizer, scheduler=None)
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
