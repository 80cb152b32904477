"""A converted checkpoint holds every entry either layer spec asks for on load, ``_extra_state``
ShardedObjects included (a missing one fails megatron's load), and loads into both specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_prolong.convert import hf_to_megatron
from tests.dist import run_distributed

from ._helpers import load_safetensors_dir, make_hf_model
from .te_spec_keys import te_spec_checkpoint_keys

NUM_LAYERS = 4  # the tiny HF model's (llama3-debug architecture)


def _stored_keys(ckpt: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def _requested_keys(model) -> set[str]:
    """Tensor keys and ShardedObject unique keys that loading ``model`` reads from a checkpoint."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {v.unique_key if isinstance(v, ShardedObject) else v.key
            for v in nested_values(model.sharded_state_dict())}


def _load_into_spec(root: str, hf_dir: str, use_te: bool):
    """On one rank: the keys this spec requests, and the largest difference between the loaded
    weights and the HF weights mapped by the adapter."""
    from megatron_prolong.convert import LlamaWeightAdapter
    from megatron_prolong.models import build_gpt_model, build_transformer_config
    from megatron_prolong.parallel import initialize
    from megatron_prolong.training.checkpoint import load_checkpoint, model_spec_from_meta, read_checkpoint_meta

    device = initialize(device="cuda" if use_te else "cpu")
    spec = model_spec_from_meta(read_checkpoint_meta(root))
    model = build_gpt_model(spec, build_transformer_config(spec), use_te=use_te)
    if device == "cuda":
        model.cuda()
    requested = _requested_keys(model)
    load_checkpoint(root, [model])  # strict
    expected = LlamaWeightAdapter(spec).hf_to_megatron_state_dict(load_safetensors_dir(Path(hf_dir)), use_te=use_te)
    loaded = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert sorted(loaded) == sorted(expected), (sorted(set(loaded) ^ set(expected)))
    diff = max((loaded[k].float().cpu() - expected[k].float()).abs().max().item() for k in expected)
    return requested, diff


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("extra_state")
    src = make_hf_model(root / "hf")
    hf_to_megatron(src, root / "meg", log=lambda _: None)
    return root / "meg", src


def test_converter_writes_what_the_te_spec_loads(converted):
    """The TE spec's keys (derived from the sources in te_spec_keys.py) are all in the checkpoint,
    ``decoder.final_layernorm._extra_state`` (te.pytorch.RMSNorm) included."""
    meg, _ = converted
    missing = te_spec_checkpoint_keys(NUM_LAYERS) - _stored_keys(meg / "iter_0000000")
    assert not missing, sorted(missing)


@pytest.mark.distributed
def test_converter_writes_what_the_local_spec_loads_and_it_loads(converted):
    meg, src = converted
    requested, diff = run_distributed(_load_into_spec, 1, (str(meg), str(src), False))[0]
    assert any(k.endswith("_extra_state/shard_0_4") for k in requested)  # the enumeration sees objects
    missing = requested - _stored_keys(meg / "iter_0000000")
    assert not missing, sorted(missing)
    assert diff == 0


@pytest.mark.gpu
def test_converted_checkpoint_loads_into_the_te_spec(converted):
    pytest.importorskip("transformer_engine", reason="the TE layer spec needs Transformer Engine")
    meg, src = converted
    requested, diff = run_distributed(_load_into_spec, 1, (str(meg), str(src), True))[0]
    # The list derived from the sources is what a real TE model asks for.
    assert requested == te_spec_checkpoint_keys(NUM_LAYERS), sorted(requested ^ te_spec_checkpoint_keys(NUM_LAYERS))
    assert diff == 0
