"""Distributed-optimizer state on disk, written in parallel and reshardable to any layout.

megatron-core 0.16.1 offers three formats for its distributed optimizer, none of which fits a
64-GPU, 8B run that must survive a layout change:

- ``fully_reshardable`` all-gathers every model shard's optimizer state onto every rank to save,
  and reads it whole on every rank to load (12 bytes x 4B parameters = 48 GB of memory per rank
  for 8B at TP 2);
- ``dp_reshardable`` writes each rank's flat buffer slice in parallel, but a resume must keep
  TP/PP/CP (the slices are positions in megatron's bucketed buffers);
- ``fully_sharded_model_space``, megatron's parallel per-parameter format, stores flattened
  slices (``ShardedTensor.flattened_range``), which 0.16.1's dist_checkpointing refuses
  ("ShardedTensor.flattened_range is not supported").

``parallel_reshardable`` (this module): every parameter of a model shard gets one *owner* among
the data-parallel ranks that share that shard (balanced by size). The owner receives the other
ranks' slices of that parameter's optimizer state (fp32 main weight, Adam moments) point to point,
and writes it as a regular per-parameter tensor under the same key, offsets and TP/PP sharding as
the model weight itself, so megatron's loader reshards it like the weights to any TP/PP/CP/DP
layout. Loading is the reverse: each owner reads its parameters' state and sends every rank the
slice that rank holds. Every rank writes and reads about 1/DP of its model shard's optimizer state
(its own share), in parallel.

Memory: the owners' whole tensors live in host memory (pinned on CUDA), never on the device. The
slices pass through one device buffer of ``STAGING_WINDOW_BYTES`` (NCCL moves device memory only),
a window of one parameter's state at a time: received into it, copied to the host, and the other
way round on load. So a background save holds no device memory while the training goes on
(megatron's writer keeps what it was handed until the save is finalised, a step or more later:
the owners' share on the device was +11.2 GiB per GPU at TP 2 x CP 4, 512K), and the device
transient of a save or load is the window (``memory_plan``'s ``checkpoint_staging``). The host
holds the rank's share, about 12 bytes x its model shard's parameters / (DP x CP), which torch's
pinned-memory cache keeps for the next save.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .. import platform

FORMAT = "parallel_reshardable"
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
"""Per-parameter tensors of megatron's DistributedOptimizer with Adam (``param``: fp32 main weight)."""
_STORED_NAME = {"param": "fp32_param"}  # megatron's own names in its model-space formats
_KEY_PREFIX = "optimizer.state"
STAGING_WINDOW_BYTES = 256 * 2**20
"""Device buffer the state passes through between the ranks and the owners' host tensors."""


def _host_tensor(numel: int, device: torch.device) -> torch.Tensor:
    """An owner's whole fp32 tensor: host memory, pinned when the state is on CUDA (asynchronous
    copies; megatron's writer takes host tensors as they are). One allocation per tensor: megatron
    clones host tensors that are views of a larger storage."""
    return torch.empty(numel, dtype=torch.float32, pin_memory=device.type == "cuda")


@dataclass
class _Param:
    index: int
    param: torch.nn.Parameter
    numel: int
    pieces: list
    """(dp rank, start, end) of every rank's slice of the flattened parameter."""
    owner: int = -1


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _my_slices(sub) -> dict:
    """model parameter -> (start, end) of this rank's slice of it in the optimizer."""
    out = {}
    for gbuf_range_maps in sub.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for bucket_map in per_bucket:
                for model_param, ranges in bucket_map["param_map"].items():
                    out[model_param] = (ranges["param"].start, ranges["param"].end)
    return out


class _Plan:
    """Who holds which slice of every parameter, and who owns (writes/reads) it. Collective over
    the optimizer's data-parallel group (every rank computes the same plan)."""

    def __init__(self, sub):
        if not hasattr(sub, "gbuf_ranges"):
            raise TypeError(f"checkpoint.optimizer_format={FORMAT} needs megatron's distributed optimizer "
                            "(parallel.distributed_optimizer=true)")
        self.sub = sub
        self.group = sub.data_parallel_group
        self.dp_size = self.group.size()
        self.dp_rank = self.group.rank()
        params = [p for buffer in sub.buffers for p in buffer.param_index_map]
        mine = _my_slices(sub)
        local = [(i, *mine[p]) for i, p in enumerate(params) if p in mine]
        gathered = [None] * self.dp_size
        dist.all_gather_object(gathered, local, group=self.group)
        pieces: list[list] = [[] for _ in params]
        for rank, items in enumerate(gathered):
            for i, start, end in items:
                if end > start:
                    pieces[i].append((rank, start, end))
        self.params = [_Param(i, p, p.numel(), sorted(pieces[i], key=lambda x: x[1])) for i, p in enumerate(params)]
        for item in self.params:
            covered = sum(e - s for _, s, e in item.pieces)
            if covered != item.numel:
                raise RuntimeError(f"optimizer slices of parameter {item.index} cover {covered} of {item.numel} "
                                   "elements; the distributed optimizer's layout is not what this format expects")
        # Largest first onto the least-loaded rank: every rank writes about 1/DP of the state.
        load = [0] * self.dp_size
        for item in sorted(self.params, key=lambda x: (-x.numel, x.index)):
            item.owner = min(range(self.dp_size), key=lambda r: (load[r], r))
            load[item.owner] += item.numel

    def owned(self) -> list[_Param]:
        return [p for p in self.params if p.owner == self.dp_rank]

    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def _slice_states(self, item: _Param) -> dict:
        tensors = self.sub._get_main_param_and_optimizer_states(item.param)
        missing = [k for k in STATE_KEYS if k not in tensors]
        if missing:
            raise TypeError(f"checkpoint.optimizer_format={FORMAT} supports Adam's state {STATE_KEYS}; "
                            f"this optimizer lacks {missing}")
        return {k: tensors[k] for k in STATE_KEYS}

    def exchange(self, full: dict, *, to_owner: bool) -> None:
        """Move slices between the owners' whole host tensors ``full[index][key]`` and every rank's
        optimizer state: towards the owners (save) or from them (load). Collective over the
        data-parallel group; every rank walks the parameters, keys and windows in the same order."""
        owned = self.owned()
        size = min(STAGING_WINDOW_BYTES // 4, max((p.numel for p in owned), default=0))
        window = torch.empty(size, dtype=torch.float32, device=owned[0].param.device) if owned else None
        for item in self.params:
            mine_held = any(r == self.dp_rank for r, _, _ in item.pieces)
            if item.owner != self.dp_rank and not mine_held:
                continue
            states = self._slice_states(item) if mine_held else None
            for key in STATE_KEYS:
                whole = full[item.index][key] if item.owner == self.dp_rank else None
                for lo in range(0, item.numel, STAGING_WINDOW_BYTES // 4):
                    hi = min(item.numel, lo + STAGING_WINDOW_BYTES // 4)
                    self._exchange_window(item, lo, hi, None if whole is None else whole[lo:hi],
                                          states[key] if mine_held else None, window, to_owner)
        if to_owner and window is not None:
            platform.synchronize(window.device)  # the host copies are complete when the save plans

    def _exchange_window(self, item: _Param, lo: int, hi: int, host, state, window, to_owner: bool) -> None:
        """Elements ``[lo, hi)`` of one state tensor of ``item``: ``host`` is the owner's host
        slice (None elsewhere), ``state`` this rank's slice of the parameter (None if it holds none)."""
        owner = item.owner == self.dp_rank
        buf = window[:hi - lo] if owner else None
        ops = []
        with torch.no_grad():
            if owner and not to_owner:
                buf.copy_(host, non_blocking=True)
            for rank, start, end in item.pieces:
                a, b = max(start, lo), min(end, hi)
                if a >= b or (not owner and rank != self.dp_rank):
                    continue
                part = state[a - start:b - start] if rank == self.dp_rank else None
                if owner and rank == self.dp_rank:
                    (buf[a - lo:b - lo].copy_(part) if to_owner else part.copy_(buf[a - lo:b - lo]))
                elif owner:
                    op = dist.irecv if to_owner else dist.isend
                    ops.append(dist.P2POp(op, buf[a - lo:b - lo], self._peer(rank), self.group))
                else:
                    op = dist.isend if to_owner else dist.irecv
                    ops.append(dist.P2POp(op, part, self._peer(item.owner), self.group))
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
            if owner and to_owner:
                host.copy_(buf, non_blocking=True)


def _sharded_metadata(model_sharded_state_dict) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
    return {sh.data: sh for sh in nested_values(tensors)}


def sharded_state_dict(optimizer, model_sharded_state_dict, *, is_loading: bool) -> dict:
    """The optimizer's part of a dist checkpoint (collective). Saving moves each parameter's
    state to its owner's host memory first; loading allocates the owners' host tensors to load into."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    meta = _sharded_metadata(model_sharded_state_dict)
    out = {}
    for i, sub in enumerate(_sub_optimizers(optimizer)):
        plan = _Plan(sub)
        full = {item.index: {k: _host_tensor(item.numel, item.param.device) for k in STATE_KEYS}
                for item in plan.owned()}
        if not is_loading:
            plan.exchange(full, to_owner=True)
        tensors = {}
        for item in plan.owned():
            sh = meta.get(item.param)
            if sh is None:
                raise KeyError("a parameter of the optimizer is missing from the model's sharded state dict")
            for key in STATE_KEYS:
                kwargs = dict(key=f"{_KEY_PREFIX}.{_STORED_NAME.get(key, key)}.{sh.key}",
                              data=full[item.index][key].view(item.param.shape),
                              # Owners write; the DP coordinate is 0 so TP/PP replicas dedupe as for weights.
                              replica_id=(*sh.replica_id[:2], 0))
                if not isinstance(sh, ShardedTensorFactory):
                    kwargs["dtype"] = torch.float32
                tensors[f"{item.index}.{key}"] = replace(sh, **kwargs)
        out[f"chained_{i}"] = {"common": sub.state_dict(), "param_state": tensors}
    return out


def load_state_dict(optimizer, loaded: dict) -> None:
    """Inverse of ``sharded_state_dict``: common state (hyper-parameters, Adam step), then each
    owner sends every rank its slices (collective)."""
    for i, sub in enumerate(_sub_optimizers(optimizer)):
        part = loaded[f"chained_{i}"]
        sub.load_state_dict(part["common"])
        plan = _Plan(sub)
        full = {item.index: {k: part["param_state"][f"{item.index}.{k}"].reshape(-1) for k in STATE_KEYS}
                for item in plan.owned()}
        plan.exchange(full, to_owner=False)
