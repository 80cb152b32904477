"""torch.distributed + megatron-core model-parallel groups, on CUDA/NCCL or CPU/gloo."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist
from megatron.core import parallel_state

from ..platform import dist_backend, init_platform, seed_model_parallel_rng


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    *,
    device: str = "auto",
    seed: int = 1234,
    timeout_minutes: int = 30,
    hierarchical_cp_sizes: list[int] | None = None,
) -> str:
    """Start torch.distributed from the torchrun environment and build megatron's groups.

    Works without torchrun too (a single process gets rank 0 of 1). Returns the device type.
    ``hierarchical_cp_sizes`` builds the two-level CP groups TE's ``a2a+p2p`` takes.
    """
    device = init_platform(device)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend=dist_backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    model_parallel = tensor_parallel * pipeline_parallel * context_parallel
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP x PP x CP = {tensor_parallel} x "
            f"{pipeline_parallel} x {context_parallel}; change the parallel sizes or the number of ranks"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        hierarchical_context_parallel_sizes=list(hierarchical_cp_sizes) if hierarchical_cp_sizes else None,
    )
    seed_model_parallel_rng(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    return device


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
