"""torch.distributed + megatron-core model-parallel groups, on CUDA/NCCL or CPU/gloo."""

from __future__ import annotations

import contextlib
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
    timeout_minutes: float = 30,
    hierarchical_cp_sizes: list[int] | None = None,
) -> str:
    """Start torch.distributed from the torchrun environment and build megatron's groups.

    Works without torchrun too (a single process gets rank 0 of 1). Returns the device type.
    ``hierarchical_cp_sizes`` builds the two-level CP groups TE's ``a2a+p2p`` takes.
    ``timeout_minutes`` bounds every collective of every group (the default group, each NCCL and
    gloo group megatron builds, the rendezvous store): a rank whose peers died or hang raises
    after that long instead of waiting forever (NCCL needs ``TORCH_NCCL_ASYNC_ERROR_HANDLING``,
    which torchrun sets; see docs/fault_tolerance.md).
    """
    device = init_platform(device)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # started by torchrun: go with the agent
        from ..lifeline import exit_with_parent

        exit_with_parent()
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
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_model_parallel_rng(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    return device


@contextlib.contextmanager
def peer_failures_reported(timeout_minutes: float):
    """Turn a failed collective (gloo's lost connection or timeout, NCCL's ``DistBackendError``)
    into a one-line ``CollectiveError``. NCCL timeouts never get here: with
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` its watchdog ends the process itself."""
    from ..errors import CollectiveError

    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not (isinstance(e, dist.DistError) or "gloo" in text):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise CollectiveError(
            f"a collective failed ({first[:300]}): a peer rank died or did not answer within "
            f"train.collective_timeout_minutes={timeout_minutes:g}; the cause is in the log of the rank that "
            "failed first. Relaunch to resume from the latest complete checkpoint") from e


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
