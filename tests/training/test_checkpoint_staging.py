"""The optimizer-state exchange of ``parallel_reshardable`` saves (training/optimizer_state.py), as
if on CUDA: what a save hands megatron's writer is in pinned host memory, and the device holds no
more than the staging window while the state moves (a background save keeps what it was handed
for a step or more; the owners' share on the device ran the 8-GPU 512K layout out of memory).

A stub stands in for megatron's distributed optimizer (its slice map, its state accessor): the
exchange only reads those. Parameters are split over the data-parallel ranks with pieces that
cross the (shrunk) window's borders.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron_prolong.platform.cuda_on_cpu import cuda_on_cpu, is_fake_cuda
from megatron_prolong.training import optimizer_state
from tests.dist import free_port, run_distributed

NUMELS = (10, 37, 64)
PIECES = {1: [[(0, 10), (0, 37), (0, 64)]],  # rank -> per parameter (start, end), for DP 1 and DP 2
          2: [[(0, 10), (0, 20), (0, 5)], [(10, 10), (20, 37), (5, 64)]]}
WINDOW_BYTES = 64  # 16 fp32 values: every parameter but the first spans several windows


def _value(param: int, key: int, start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end, dtype=torch.float32) + 1000 * param + 100_000 * key


class _StubOptimizer:
    """What ``optimizer_state`` reads of megatron's DistributedOptimizer, for this rank's slices."""

    def __init__(self, group, dp_size: int, rank: int, device):
        self.data_parallel_group = group
        self.params = [torch.zeros(n, device=device) for n in NUMELS]
        self.buffers = [SimpleNamespace(param_index_map={p: None for p in self.params})]
        mine = PIECES[dp_size][rank]
        self.gbuf_ranges = [{torch.float32: [{"param_map": {
            p: {"param": SimpleNamespace(start=mine[i][0], end=mine[i][1])} for i, p in enumerate(self.params)}}]}]
        self.state = {p: {key: _value(i, k, *mine[i]).to(device) for k, key in enumerate(optimizer_state.STATE_KEYS)}
                      for i, p in enumerate(self.params)}

    def _get_main_param_and_optimizer_states(self, param):
        return self.state[param]

    def state_dict(self):
        return {}


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _stage(group, device: str) -> dict:
    """What a save hands megatron for the optimizer of the stub: {name: (tensor, index, key)}."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    opt = _StubOptimizer(group, 1, 0, device)
    model_sd = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", p, replica_id=(0, 0, 0))
                for i, p in enumerate(opt.params)}
    out = optimizer_state.sharded_state_dict(opt, model_sd, is_loading=False)["chained_0"]["param_state"]
    assert len(out) == 3 * len(NUMELS)
    return out


def _check_handed(handed: dict) -> None:
    for name, sh in handed.items():
        index, key = name.split(".")
        assert sh.data.device.type == "cpu" and sh.data.is_pinned(), f"{name} is not in pinned host memory"
        want = _value(int(index), optimizer_state.STATE_KEYS.index(key), 0, NUMELS[int(index)])
        assert torch.equal(sh.data, want), name


def test_save_hands_pinned_host_tensors_and_holds_only_the_window_on_the_device(one_rank_group, monkeypatch):
    monkeypatch.setattr(optimizer_state, "STAGING_WINDOW_BYTES", WINDOW_BYTES, raising=False)
    with cuda_on_cpu() as log:
        handed = _stage(one_rank_group, "cuda")
        assert not any(is_fake_cuda(sh.data) for sh in handed.values())
        _check_handed(handed)
        window = [n for n in log.device_allocations if n not in (4 * n for n in NUMELS)]
        assert window == [WINDOW_BYTES] and len(log.device_allocations) == 1 + len(NUMELS), log.device_allocations
        assert log.syncs == ["torch.cuda.synchronize"], log.syncs  # one wait, for the host copies


@pytest.mark.gpu
def test_save_staging_on_cuda(one_rank_group, monkeypatch):
    monkeypatch.setattr(optimizer_state, "STAGING_WINDOW_BYTES", WINDOW_BYTES)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    handed = _stage(one_rank_group, "cuda")
    _check_handed(handed)
    # Every tensor here takes one of the allocator's 512-byte blocks: the stub's parameters and
    # states (4 per parameter), the window, a few blocks of slack; the owners' whole tensors on the
    # device would add 3 per parameter (9).
    assert torch.cuda.max_memory_allocated() - before <= 512 * (4 * len(NUMELS) + 1 + 4)


def _rank_round_trip(fake_cuda: bool):
    optimizer_state.STAGING_WINDOW_BYTES = WINDOW_BYTES
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with cuda_on_cpu() if fake_cuda else _no_context():
        opt = _StubOptimizer(dist.group.WORLD, 2, rank, "cuda" if fake_cuda else "cpu")
        plan = optimizer_state._Plan(opt)
        full = {item.index: {k: optimizer_state._host_tensor(item.numel, item.param.device)
                             for k in optimizer_state.STATE_KEYS} for item in plan.owned()}
        plan.exchange(full, to_owner=True)
        saved = {(i, k): bool(torch.equal(t, _value(i, optimizer_state.STATE_KEYS.index(k), 0, NUMELS[i])))
                 for i, by_key in full.items() for k, t in by_key.items()}
        expected = {p: {k: v.cpu().clone() for k, v in s.items()} for p, s in opt.state.items()}
        for s in opt.state.values():
            for v in s.values():
                v.zero_()
        plan.exchange(full, to_owner=False)
        loaded = all(torch.equal(v.cpu(), expected[p][k]) for p, s in opt.state.items() for k, v in s.items())
    return saved, loaded


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_two_ranks_exchange_through_the_window_both_ways():
    """Pieces on both ranks, across window borders: the owners' host tensors are the whole state
    (save) and every rank gets its slices back (load); P2P buffers are device tensors (NCCL)."""
    results = run_distributed(_rank_round_trip, world_size=2, args=(True,))
    owned = sorted(i for saved, _ in results for i, _ in saved)
    assert owned == sorted(list(range(len(NUMELS))) * 3)  # every parameter's 3 tensors, by one owner
    for saved, loaded in results:
        assert all(saved.values()), saved
        assert loaded
