"""Streaming access to megatron-core ``torch_dist`` checkpoints, one tensor (or layer) at a time.

Writing. megatron's ``dist_checkpointing.save`` needs the whole sharded state dict in memory,
and an 8B model in memory is what we want to avoid. The ``torch_dist`` format is plain PyTorch
DCP plus two small files, so we write it with DCP directly:

* every ShardedTensor is stored under its sharded key (e.g.
  ``decoder.layers.mlp.linear_fc1.weight``) with its *global* shape; layer tensors have a
  leading layer axis and are stored as one ``[1, ...]`` chunk per layer (exactly how megatron
  itself stores a TP=1 save). The loader reads any overlapping region, so the trainer
  reshards it to any TP/PP at load time;
* every ShardedObject (``_extra_state``) is a BYTE_IO item under its ``unique_key``
  (``{key}/shard_{offset}_{global_shape}``) holding ``torch.save([obj])``;
* ``metadata.json`` names the backend (``torch_dist``, version 1) and ``common.pt`` holds the
  non-sharded part of the state dict.

:class:`StreamingSavePlanner` hands DCP a plan made of metadata only; DCP then asks for each
item's data (``resolve_data``) while it writes, and we produce it on demand from the source.
:class:`_PerGroupFileSystemWriter` puts each group of items (a layer) in its own ``.distcp``
file, because torch's writer keeps a reference to the last tensor of every key until the file
it is writing is closed; one file per layer bounds that to one layer.

Reading goes through megatron's own ``dist_checkpointing.load`` with a partial sharded state
dict (one layer's tensors), so any checkpoint the trainer wrote (any TP/PP, with or without
optimizer state) is read the way the trainer reads it.
"""

from __future__ import annotations

import io
import json
import os
import queue
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (SavePlan, SavePlanner, TensorWriteData, WriteItem,
                                                  WriteItemType)


@dataclass
class PlannedTensor:
    """One chunk of a (global) tensor to write, produced lazily by ``produce()``."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    group: str
    """Items of one group go to one file, written together (e.g. ``layer_003``)."""


@dataclass
class PlannedObject:
    """One ShardedObject (bytes item) to write."""

    unique_key: str
    value: object
    group: str


@dataclass
class StreamingSavePlanner(SavePlanner):
    """A DCP save planner over :class:`PlannedTensor` / :class:`PlannedObject` items.

    Only metadata is needed to plan; data is produced in ``resolve_data`` while DCP writes,
    then dropped, so at most one item is alive at a time (plus what the writer retains).
    """

    tensors: list[PlannedTensor]
    objects: list[PlannedObject]
    on_item_written: Callable[[PlannedTensor], None] | None = None
    _by_index: dict = field(default_factory=dict)
    _last: PlannedTensor | None = None

    def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator=True, *args, **kwargs) -> None:
        self._by_index = {}
        for t in self.tensors:
            self._by_index[(t.key, tuple(t.offsets))] = t
        for o in self.objects:
            self._by_index[(o.unique_key, None)] = o

    def create_local_plan(self) -> SavePlan:
        items = []
        # Tensors in the order given (the per-group writer keeps the order of first appearance).
        for t in self.tensors:
            items.append(WriteItem(
                index=MetadataIndex(t.key, torch.Size(t.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(t.offsets), sizes=torch.Size(t.shape)),
                    properties=TensorProperties(dtype=t.dtype),
                    size=torch.Size(t.global_shape),
                ),
            ))
        for o in self.objects:
            items.append(WriteItem(index=MetadataIndex(o.unique_key), type=WriteItemType.BYTE_IO))
        return SavePlan(items)

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        global_plan, metadata = create_default_global_save_plan(all_plans)
        _check_full_coverage(metadata)
        return global_plan, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if self._last is not None and self.on_item_written is not None:
            self.on_item_written(self._last)  # DCP asks for item n+1 only after writing item n
            self._last = None
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._by_index[(write_item.index.fqn, None)].value], buf)
            buf.seek(0)
            return buf
        planned = self._by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = planned.produce()
        if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
            raise RuntimeError(f"{planned.key}@{planned.offsets}: produced {tuple(tensor.shape)} "
                               f"{tensor.dtype}, planned {planned.shape} {planned.dtype}")
        self._last = planned
        return tensor.contiguous()

    def finish(self) -> None:
        if self._last is not None and self.on_item_written is not None:
            self.on_item_written(self._last)
            self._last = None


def _check_full_coverage(metadata: Metadata) -> None:
    """Every stored tensor must be covered exactly by its chunks (no holes, no overlaps)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        total = 1
        for s in md.size:
            total *= s
        covered = 0
        for c in md.chunks:
            n = 1
            for s in c.sizes:
                n *= s
            covered += n
            if any(o + s > g for o, s, g in zip(c.offsets, c.sizes, md.size)):
                raise RuntimeError(f"{key}: chunk {tuple(c.offsets)}+{tuple(c.sizes)} outside {tuple(md.size)}")
        if covered != total:
            raise RuntimeError(f"{key}: chunks cover {covered} of {total} elements")


class _PerGroupFileSystemWriter(FileSystemWriter):
    """DCP FileSystemWriter writing one ``.distcp`` file per item group, serially.

    Why: torch's file writer keeps the last tensor written under each key alive until it closes
    the file (``tensor_dict`` in ``_write_files_from_queue``). With one file per layer that is at
    most one layer. Falls back to the stock single-file layout if torch's internals change.
    """

    def __init__(self, path: Path, group_of: Callable[[WriteItem], str]):
        # per_thread_copy_ahead=0: never resolve items ahead of writing (that is for GPU copies).
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                         per_thread_copy_ahead=0)
        self._group_of = group_of

    def write_data(self, plan: SavePlan, planner: SavePlanner):
        if not hasattr(self, "_write_data"):  # older/newer torch: stock behaviour, still correct
            return super().write_data(plan, planner)
        buckets: dict[str, list[WriteItem]] = {}
        for item in plan.items:
            buckets.setdefault(self._group_of(item), []).append(item)
        file_queue: queue.Queue = queue.Queue()
        for n, items in enumerate(buckets.values()):
            file_name = f"{plan.storage_data.prefix}{n}.distcp"
            file_queue.put((self.fs.concat_path(self.path, file_name), file_name, items))
        return self._write_data(planner, file_queue)


def write_torch_dist_checkpoint(checkpoint_dir: Path, tensors: list[PlannedTensor], objects: list[PlannedObject],
                                common_state: dict, on_item_written: Callable[[PlannedTensor], None] | None = None
                                ) -> None:
    """Write a megatron ``torch_dist`` checkpoint directory from lazily produced items."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=False)
    group_by_index = {(t.key, tuple(t.offsets)): t.group for t in tensors}
    group_by_index.update({(o.unique_key, None): o.group for o in objects})

    def group_of(item: WriteItem) -> str:
        off = None if item.type == WriteItemType.BYTE_IO else tuple(item.index.offset)
        return group_by_index[(item.index.fqn, off)]

    planner = StreamingSavePlanner(tensors=tensors, objects=objects, on_item_written=on_item_written)
    writer = _PerGroupFileSystemWriter(checkpoint_dir, group_of)
    with warnings.catch_warnings():
        # DCP warns that it runs single-process; that is the intent here.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
    planner.finish()
    torch.save(common_state, checkpoint_dir / "common.pt")
    # Written last: megatron treats a directory with metadata.json as a dist checkpoint.
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    save_config(CheckpointingConfig("torch_dist", 1), str(checkpoint_dir))


# ---------------------------------------------------------------------------------- reading
class single_process_group:
    """Context: megatron's ``dist_checkpointing.load`` needs torch.distributed, so start a 1-rank
    gloo group (in-memory store: no port, no environment) unless one is running; stop it after."""

    def __enter__(self):
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class StoredTensor:
    global_shape: tuple[int, ...]
    dtype: torch.dtype


def tensors_metadata(checkpoint_dir: Path) -> dict[str, StoredTensor]:
    """``{sharded key: global shape + dtype}`` of every tensor in a torch_dist checkpoint.

    Read from the DCP ``.metadata`` directly: megatron-core 0.16.1's
    ``dist_checkpointing.load_tensors_metadata`` fails on torch >= 2.15 (it passes the new
    ``TensorProperties.strides`` field to ``torch.empty``).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    return {key: StoredTensor(tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


@dataclass(frozen=True)
class TensorRequest:
    key: str
    """Full sharded key in the checkpoint (including any outer prefix)."""
    global_shape: tuple[int, ...]
    layer: int | None
    """Index along the stacked layer axis, or None for a non-layer tensor (read whole)."""
    dtype: torch.dtype


def read_tensors(checkpoint_dir: Path, requests: dict[str, TensorRequest]) -> dict[str, torch.Tensor]:
    """Read some tensors (or single layers of stacked tensors) through megatron's loader."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not dist.is_initialized():
        raise RuntimeError("read_tensors needs torch.distributed: use `with single_process_group():`")
    sharded = {}
    for name, r in requests.items():
        if r.layer is None:
            sharded[name] = ShardedTensor.from_rank_offsets(r.key, torch.empty(r.global_shape, dtype=r.dtype))
        else:
            num_layers = r.global_shape[0]
            # A [1, ...] chunk at offset ``layer`` of the [L, ...] tensor. Not the model's own
            # ``prepend_axis_num=1`` form: on one rank megatron turns that into a torch
            # ShardedTensor that must hold *every* layer locally.
            buf = torch.empty((1, *r.global_shape[1:]), dtype=r.dtype)
            sharded[name] = ShardedTensor.from_rank_offsets(r.key, buf, (0, r.layer, num_layers))
    # validate_access_integrity=False: we deliberately read a part of the checkpoint.
    loaded = dist_checkpointing.load(sharded, str(checkpoint_dir), validate_access_integrity=False)
    return {name: (loaded[name] if r.layer is None else loaded[name][0]) for name, r in requests.items()}


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
