"""The checkpoint layout module: names, listings, and model-spec decoding that refuses what it
does not know (one decoder for the trainer and the converters)."""

from __future__ import annotations

import json

import pytest

from megatron_prolong import checkpoint_layout as layout
from megatron_prolong.models import get_model_spec


def test_spec_round_trip_and_unknown_fields():
    spec = get_model_spec("llama3-debug", rotary_base=8e6)
    assert layout.decode_model_spec(layout.encode_model_spec(spec)) == spec
    data = {**layout.encode_model_spec(spec), "sliding_window": 4096}
    with pytest.raises(layout.CheckpointError, match=r"does not know: \['sliding_window'\]"):
        layout.decode_model_spec(data, where="ckpt/x")
    data = layout.encode_model_spec(spec)
    del data["hidden_size"]
    with pytest.raises(layout.CheckpointError, match=r"lacks required fields \['hidden_size'\]"):
        layout.decode_model_spec(data)


def test_listing_complete_iterations_and_leftovers(tmp_path):
    for it in (2, 4):
        d = layout.iteration_dir(tmp_path, it)
        d.mkdir()
        layout.write_checkpoint_meta(d, {"iteration": it})
    layout.iteration_dir(tmp_path, 6).mkdir()  # no metadata: never completed
    layout.partial_dir(tmp_path, 8).mkdir()
    assert layout.list_iterations(tmp_path) == [2, 4]
    assert [p.name for p in layout.list_partials(tmp_path)] == [".iter_0000008.partial", "iter_0000006"]
    assert json.loads((layout.iteration_dir(tmp_path, 4) / layout.META_FILE).read_text())["iteration"] == 4


def test_damaged_metadata_names_the_file(tmp_path):
    d = layout.iteration_dir(tmp_path, 3)
    d.mkdir()
    (d / layout.META_FILE).write_text("{not json")
    with pytest.raises(layout.CheckpointError, match="prolong_meta.json is not valid JSON"):
        layout.read_checkpoint_meta(tmp_path, 3)
