"""Trainer (megatron-core dist) checkpoint -> Hugging Face ``LlamaForCausalLM`` folder, streamed.

The checkpoint can come from any TP/PP layout: megatron's loader assembles each requested
layer slice from whatever shards hold it. Output shards are planned from the checkpoint's
metadata before any data is read, so each safetensors file is written tensor by tensor.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from ..models.registry import ModelSpec
from .adapter import LlamaWeightAdapter
from .dist_io import TensorRequest, read_tensors, single_process_group, tensors_metadata, write_json_atomic
from ..checkpoint_layout import model_spec_from_meta
from .hf_config import hf_config_from_spec
from .hf_to_megatron import INDEX_FILE, ConversionError
from .layout import check_output_dir, read_checkpoint_meta, resolve_checkpoint, staged_output
from .progress import Progress
from .token_ids import resolve_export_token_ids
from .safetensors_stream import SafetensorsShardWriter, plan_shards

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' own default "5GB"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def find_model_prefix(keys: list[str]) -> str:
    """The outer prefix of the model's keys in the checkpoint ('' for megatron's default)."""
    suffix = "embedding.word_embeddings.weight"
    candidates = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix) and "optimizer" not in k)
    if not candidates:
        raise ConversionError(f"no {suffix} in the checkpoint: not a GPT model checkpoint "
                              f"(keys: {sorted(keys)[:5]}...)")
    return candidates[0]  # the shortest: '' sorts before 'model.'


def megatron_to_hf(meg_dir: Path, out_dir: Path, *, iteration: int | None = None, tokenizer_dir: Path | None = None,
                   dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   log: Callable[[str], None] = print) -> ModelSpec:
    """Convert the trainer checkpoint at ``meg_dir`` (latest iteration unless given) to HF."""
    meg_dir, out_dir = Path(meg_dir), Path(out_dir)
    check_output_dir(out_dir)
    ckpt, iteration = resolve_checkpoint(meg_dir, iteration)
    meta = read_checkpoint_meta(meg_dir, iteration)
    spec = model_spec_from_meta(meta, where=str(meg_dir))
    adapter = LlamaWeightAdapter(spec)
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).exists() for f in TOKENIZER_FILES):
            raise ConversionError(f"--tokenizer {tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}) there")

    # Check every tensor against the spec before writing anything.
    md = tensors_metadata(ckpt)
    prefix = find_model_prefix(list(md))
    requests = []  # (group, layer, TensorRequest) in HF order
    problems = []
    stored_dtypes = set()
    for g, layer in _groups_in_hf_order(adapter):
        key = prefix + g.megatron_key
        expected = adapter.megatron_global_shape(g)
        if key not in md:
            problems.append(f"{key} missing")
            continue
        got = tuple(md[key].global_shape)
        if got != expected:
            problems.append(f"{key}: shape {got}, model_spec implies {expected}")
            continue
        stored_dtypes.add(md[key].dtype)
        requests.append((g, layer, TensorRequest(key, expected, layer, md[key].dtype)))
    if problems:
        raise ConversionError(f"{ckpt} does not match its model_spec:\n  - " + "\n  - ".join(problems[:12]))
    if dtype is None:
        out_dtype = torch.bfloat16 if torch.bfloat16 in stored_dtypes else sorted(stored_dtypes, key=str)[0]
    elif dtype in DTYPES:
        out_dtype = DTYPES[dtype]
    else:
        raise ConversionError(f"--dtype {dtype!r}: choose one of bf16, fp16, fp32")

    # Plan the HF tensors and shards from shapes alone.
    hf_specs = []
    for g, layer, _ in requests:
        for name, shape in zip(adapter.hf_names(g, layer), adapter.hf_shapes(g)):
            hf_specs.append((name, tuple(shape), out_dtype))
    shards = plan_shards(hf_specs, max_shard_bytes)
    total_bytes = sum(_nbytes(s) for s in hf_specs)
    shard_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    log(f"[megatron-to-hf] {ckpt} (iteration {iteration}, saved at {meta.get('parallel', '?')}) -> {out_dir}: "
        f"{spec.num_layers} layers, {total_bytes / 1e9:.2f} GB as {str(out_dtype).replace('torch.', '')} "
        f"in {len(shards)} shard(s)")

    progress = Progress("megatron-to-hf", total_bytes, log)
    with staged_output(out_dir) as tmp:
        with single_process_group():
            _write_weights(ckpt, adapter, requests, shards, shard_names, tmp, out_dtype, progress)
        weight_map = {name: shard_names[i] for i, shard in enumerate(shards) for name, _, _ in shard}
        write_json_atomic(tmp / INDEX_FILE, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
        ids = resolve_export_token_ids(meta, ckpt, spec.vocab_size, tokenizer_dir)
        log(f"[megatron-to-hf] token ids {ids.config_token_ids}, generation eos "
            f"{ids.generation_config.get('eos_token_id')} ({ids.source})")
        write_json_atomic(tmp / "config.json", hf_config_from_spec(
            spec, torch_dtype=str(out_dtype).replace("torch.", ""), token_ids=ids.config_token_ids))
        write_json_atomic(tmp / "generation_config.json", ids.generation_config)
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (tokenizer_dir / f).exists():
                    shutil.copy2(tokenizer_dir / f, tmp / f)
    progress.done()
    return spec


def _groups_in_hf_order(adapter: LlamaWeightAdapter):
    """(group, layer) pairs: embedding, every layer's tensors, final norm, output layer."""
    non_layer = [g for g in adapter.groups if not g.per_layer]
    yield non_layer[0], None
    for layer in range(adapter.spec.num_layers):
        for g in adapter.groups:
            if g.per_layer:
                yield g, layer
    for g in non_layer[1:]:
        yield g, None


def _write_weights(ckpt, adapter, requests, shards, shard_names, out, out_dtype, progress) -> None:
    """Read one load unit (a layer, or one non-layer tensor) at a time; stream into the shards."""
    shard_iter = iter(zip(shards, shard_names))
    writer, remaining = None, []

    def emit(name: str, tensor: torch.Tensor) -> None:
        nonlocal writer, remaining
        if not remaining:
            if writer is not None:
                writer.close()
            specs, file_name = next(shard_iter)
            writer, remaining = SafetensorsShardWriter(out / file_name, specs), [s[0] for s in specs]
        writer.write(name, tensor)
        remaining.pop(0)

    units: list[list] = []
    for g, layer, req in requests:
        if layer is not None and units and units[-1][0][1] == layer:
            units[-1].append((g, layer, req))
        else:
            units.append([(g, layer, req)])
    for unit in units:
        loaded = read_tensors(ckpt, {f"t{k}": req for k, (_, _, req) in enumerate(unit)})
        label = f"layer {unit[0][1] + 1}/{adapter.spec.num_layers}" if unit[0][1] is not None else unit[0][0].megatron_key
        for k, (g, layer, _) in enumerate(unit):
            tensor = loaded.pop(f"t{k}")
            for name, hf_tensor in zip(adapter.hf_names(g, layer), adapter.to_hf(g, tensor)):
                hf_tensor = hf_tensor.to(out_dtype)
                emit(name, hf_tensor)
                progress.advance(hf_tensor.numel() * hf_tensor.element_size(), label)
            del tensor
    if writer is not None:
        writer.close()
    if next(shard_iter, None) is not None or remaining:
        raise RuntimeError("internal error: planned shards were not all written")


def _nbytes(s) -> int:
    n = torch.empty((), dtype=s[2]).element_size()
    for d in s[1]:
        n *= d
    return n
