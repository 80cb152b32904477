"""The config tree: YAML + overrides, and bad configs rejected with a message that says how to fix."""

from __future__ import annotations

import pytest

from megatron_prolong.config import Config, ConfigError, load_config

OK = ["data.mock=true", "train.global_batch_size=8"]


def test_yaml_and_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: llama3-8b\n  rotary_base: 8.0e+6\ndata:\n  mock: true\n"
                      "train:\n  seq_length: 65536\n  global_batch_tokens: 4194304\n")
    cfg = load_config(recipe, ["optim.lr=2e-5", "parallel.context=8", "train.recompute=full"])
    assert cfg.model.spec().rotary_base == 8e6
    assert cfg.train.global_batch_size == 64  # 4M tokens / 64K
    assert cfg.optim.lr == pytest.approx(2e-5)  # YAML reads "2e-5" as a string: coerced
    assert cfg.parallel.context == 8 and cfg.train.recompute == "full"


def test_every_example_recipe_loads():
    from pathlib import Path

    recipes = sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml"))
    assert recipes
    for recipe in recipes:
        load_config(recipe, ["data.mock=true", "data.blend=null", "data.mixture=null", "data.data_prefix=null",
                             "checkpoint.init_from=null"])


@pytest.mark.parametrize("overrides, message", [
    (["modle.name=x"], "did you mean 'model'"),
    (["model.nmae=x"], "did you mean model.'name'"),
    (["model.name=llama4"], "choose one of"),
    (["parallel.tensor=3"], "must divide the 4 attention heads"),
    (["parallel.pipeline=3"], "must divide the 4 layers"),
    (["parallel.context=2", "train.seq_length=30"], "multiple of 2 x parallel.context"),
    (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
    (["train.global_batch_tokens=100", "train.global_batch_size=null", "train.seq_length=64"], "not a multiple"),
    (["train.global_batch_tokens=128"], "exactly one of"),
    (["train.steps=ten"], "must be int"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["checkpoint.save_interval=5"], "needs checkpoint.save_dir"),
    (["checkpoint.init_from=/nonexistent/ckpt"], "is not a directory"),
    (["model.overrides={num_layerz: 2}"], "unknown model fields"),
    (["train.recompute=some"], "none, selective or full"),
    (["parallel.cp_comm_type=ring"], "p2p, all_gather, a2a or a2a+p2p"),
])
def test_bad_config_fails_fast(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_config(None, OK + overrides)


def test_data_section_is_required():
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["train.global_batch_size=8"])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/recipe.yaml")


def test_world_size_checks():
    cfg = load_config(None, OK + ["parallel.tensor=2", "parallel.pipeline=2", "train.micro_batch_size=2"])
    cfg.check_world(8)  # DP 2, 8 = 2 x 2 x 2
    with pytest.raises(ConfigError, match="not divisible by TP x PP x CP"):
        cfg.check_world(6)
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel size"):
        cfg.check_world(12)  # DP 3: 8 samples cannot split into 3 x 2


def test_defaults_are_a_valid_tree():
    assert isinstance(load_config(None, ["data.mock=true"]), Config)
