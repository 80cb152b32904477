"""Hugging Face Llama safetensors -> model-only megatron-core dist checkpoint, streamed.

Everything is validated from the safetensors headers before a byte is written (config,
names, shapes, dtypes, missing shards); then each Megatron tensor is produced from its HF
tensor(s) only when PyTorch DCP writes it, so memory holds about one layer at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..models.registry import ModelSpec, get_model_spec
from .adapter import IGNORED_HF_SUFFIXES, LlamaWeightAdapter, extra_state_objects
from .dist_io import PlannedObject, PlannedTensor, write_json_atomic, write_torch_dist_checkpoint
from ..checkpoint_layout import encode_model_spec
from .hf_config import check_against_registry, spec_from_hf_config
from .layout import LATEST_FILE, META_FILE, check_output_dir, iteration_dir, staged_output
from .progress import Progress
from .safetensors_stream import TensorEntry, read_header, read_tensor
from .token_ids import META_KEY as GENERATION_META_KEY
from .token_ids import read_hf_generation

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ConversionError(ValueError):
    """Bad input for a conversion (the message says what and how to fix it)."""


def index_hf_checkpoint(hf_dir: Path) -> dict[str, TensorEntry]:
    """Map every tensor name of an HF checkpoint to where it is stored (headers only)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX_FILE).exists():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).exists()]
        if missing:
            raise ConversionError(f"{hf_dir}: {len(missing)} shard(s) listed in {INDEX_FILE} are missing: "
                                  f"{missing[:5]}")
        entries: dict[str, TensorEntry] = {}
        for f in files:
            header = read_header(hf_dir / f)
            for name, file_name in weight_map.items():
                if file_name == f:
                    if name not in header:
                        raise ConversionError(f"{hf_dir / f}: {INDEX_FILE} lists {name} here but the file lacks it")
                    entries[name] = header[name]
        return entries
    if (hf_dir / SINGLE_FILE).exists():
        return read_header(hf_dir / SINGLE_FILE)
    found = sorted(p.name for p in hf_dir.iterdir()) if hf_dir.is_dir() else "no such folder"
    hint = " (PyTorch .bin checkpoints: re-save them with safe_serialization=True)" if any(
        str(n).endswith(".bin") for n in (found if isinstance(found, list) else [])) else ""
    raise ConversionError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found{hint}; contents: {found}")


def read_hf_spec(hf_dir: Path, *, model_name: str | None = None, rotary_base: float | None = None,
                 untie_embeddings: bool = False) -> tuple[ModelSpec, dict]:
    """ModelSpec of an HF Llama folder (checked against ``model_name`` from the registry if given)."""
    cfg_path = Path(hf_dir) / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{cfg_path} not found")
    cfg = json.loads(cfg_path.read_text())
    spec = spec_from_hf_config(cfg, name=model_name or Path(hf_dir).resolve().name,
                               rotary_base=rotary_base, untie_embeddings=untie_embeddings)
    if model_name:
        check_against_registry(spec, get_model_spec(model_name))
    return spec, cfg


def hf_to_megatron(hf_dir: Path, out_dir: Path, *, model_name: str | None = None, rotary_base: float | None = None,
                   untie_embeddings: bool = False, log: Callable[[str], None] = print) -> ModelSpec:
    """Convert ``hf_dir`` into a model-only trainer checkpoint at ``out_dir`` (iteration 0)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output_dir(out_dir)
    spec, hf_cfg = read_hf_spec(hf_dir, model_name=model_name, rotary_base=rotary_base,
                                untie_embeddings=untie_embeddings)
    adapter = LlamaWeightAdapter(spec)
    entries = index_hf_checkpoint(hf_dir)
    tied = bool(hf_cfg.get("tie_word_embeddings", False))
    _validate_hf_tensors(adapter, entries, tied=tied)

    tensors, objects, total_bytes = _plan(adapter, entries, tied=tied)
    progress = Progress("hf-to-megatron", total_bytes, log)
    log(f"[hf-to-megatron] {hf_dir} -> {out_dir}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.num_attention_heads} heads / {spec.num_query_groups} KV groups, vocab {spec.vocab_size}, "
        f"rope theta {spec.rotary_base:g}{f', llama3 rope scaling x{spec.rope_scaling_factor:g}' if spec.rope_scaling else ''}, "
        f"{total_bytes / 1e9:.2f} GB")
    if tied:
        log("[hf-to-megatron] tie_word_embeddings=true: output_layer starts as a copy of the embedding "
            "(the trainer keeps them untied)")

    with staged_output(out_dir) as tmp:
        ckpt = iteration_dir(tmp, 0)
        dtype = entries["model.embed_tokens.weight"].dtype
        write_torch_dist_checkpoint(ckpt, tensors, objects, common_state={},
                                    on_item_written=lambda t: progress.advance(_nbytes(t), t.group))
        meta = {
            "iteration": 0,
            "model_spec": encode_model_spec(spec),
            "has_optimizer": False,
            # Shards are stored whole (as a TP=1/PP=1 save would be); the trainer reshards on load.
            "parallel": {"tensor": 1, "pipeline": 1, "context": 1, "data": 1},
            "train_state": {},
            "dtype": str(dtype).replace("torch.", ""),
            "converted_from": {"format": "huggingface", "path": str(hf_dir.resolve()),
                               "rope_theta_in_source": hf_cfg.get("rope_theta")},
            # Token ids and generation config (eos!) for megatron-to-hf: see token_ids.py.
            GENERATION_META_KEY: read_hf_generation(hf_dir),
        }
        write_json_atomic(ckpt / META_FILE, meta)
        shutil.copy2(hf_dir / "config.json", ckpt / "hf_config.json")  # the source config, for reference
        (tmp / LATEST_FILE).write_text("0\n")
    progress.done()
    return spec


def _nbytes(t: PlannedTensor) -> int:
    n = torch.empty((), dtype=t.dtype).element_size()
    for s in t.shape:
        n *= s
    return n


def _validate_hf_tensors(adapter: LlamaWeightAdapter, entries: dict[str, TensorEntry], *, tied: bool) -> None:
    expected: dict[str, tuple] = {}
    for g in adapter.groups:
        for layer in (range(adapter.spec.num_layers) if g.per_layer else [None]):
            for name, shape in zip(adapter.hf_names(g, layer), adapter.hf_shapes(g)):
                expected[name] = shape
    if tied and "lm_head.weight" not in entries:
        expected.pop("lm_head.weight")
    present = {n for n in entries if not n.endswith(IGNORED_HF_SUFFIXES)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not a plain Llama model, or more layers than "
                        f"config.json says), e.g. {unexpected[:4]}")
    for name, shape in expected.items():
        if name in entries and entries[name].shape != tuple(shape):
            problems.append(f"{name}: shape {entries[name].shape}, config.json implies {tuple(shape)}")
    dtypes = {entries[n].dtype for n in expected if n in entries}
    if len(dtypes) > 1:
        problems.append(f"mixed dtypes {sorted(map(str, dtypes))} (expected one dtype for all weights)")
    if dtypes and not next(iter(dtypes)).is_floating_point:
        problems.append(f"weights have non-float dtype {dtypes}")
    if problems:
        raise ConversionError("the HF checkpoint does not match its config.json:\n  - " + "\n  - ".join(problems[:12]))


def _plan(adapter: LlamaWeightAdapter, entries: dict[str, TensorEntry], *, tied: bool
          ) -> tuple[list[PlannedTensor], list[PlannedObject], int]:
    """Megatron items in write order: embedding, layer 0..L-1, final norm, output layer."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    spec = adapter.spec
    tensors: list[PlannedTensor] = []
    objects: list[PlannedObject] = []
    dtype = entries["model.embed_tokens.weight"].dtype

    def producer(group, names):
        def produce():
            return adapter.to_megatron(group, [read_tensor(entries[n]) for n in names])
        return produce

    def hf_names(group, layer):
        names = adapter.hf_names(group, layer)
        if tied and names == ["lm_head.weight"] and "lm_head.weight" not in entries:
            names = ["model.embed_tokens.weight"]
        return names

    non_layer = [g for g in adapter.groups if not g.per_layer]
    layer_groups = [g for g in adapter.groups if g.per_layer]
    extra_by_layer: dict[int | None, list[PlannedObject]] = {}
    for key, global_shape, offset, layer in extra_state_objects(spec.num_layers):
        obj = ShardedObject(key, None, global_shape, offset, replica_id=0)
        group_name = f"layer {layer + 1}/{spec.num_layers}" if layer is not None else "extra_state"
        extra_by_layer.setdefault(layer, []).append(PlannedObject(obj.unique_key, None, group_name))
    for g in non_layer[:1]:
        shape = adapter.megatron_shape(g)
        tensors.append(PlannedTensor(g.megatron_key, shape, (0,) * len(shape), shape, dtype,
                                     producer(g, hf_names(g, None)), g.megatron_key))
    for layer in range(spec.num_layers):
        group_name = f"layer {layer + 1}/{spec.num_layers}"
        for g in layer_groups:
            shape = adapter.megatron_shape(g)
            tensors.append(PlannedTensor(
                g.megatron_key, adapter.megatron_global_shape(g), (layer,) + (0,) * len(shape), (1, *shape),
                dtype, _unsqueezed(producer(g, hf_names(g, layer))), group_name))
        objects += extra_by_layer.get(layer, [])
    for g in non_layer[1:]:
        shape = adapter.megatron_shape(g)
        tensors.append(PlannedTensor(g.megatron_key, shape, (0,) * len(shape), shape, dtype,
                                     producer(g, hf_names(g, None)), g.megatron_key))
    objects += extra_by_layer.get(None, [])
    return tensors, objects, sum(_nbytes(t) for t in tensors)


def _unsqueezed(produce):
    """A layer's tensor as a ``[1, ...]`` chunk of the stacked ``[L, ...]`` tensor."""
    return lambda: produce().unsqueeze(0)
