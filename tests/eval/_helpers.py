"""Shared by the evaluation tests."""

from __future__ import annotations


def write_initial_checkpoint(path: str, overrides: list[str]):
    """A model-only checkpoint of the freshly initialised model of ``overrides`` (run on a spawned
    rank). The run's config is stored as a trainer would store it: it tells ``evaluate.py`` the
    trained context (``train.seq_length``)."""
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.checkpoint import save_checkpoint
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model

    cfg = load_config(None, ["data.mock=true", "train.device=cpu", "train.global_batch_size=1"] + overrides)
    run = resolve_run(cfg)
    save_checkpoint(path, 0, build_model(cfg, run), model_spec=run.spec, train_state={"config": cfg.to_dict()})
    destroy()
