"""Run a function on N local ranks (gloo on CPU) and collect what each rank returns.

Usage in a test::

    results = run_distributed(_my_rank_fn, world_size=2, args=(cfg,))

``_my_rank_fn`` must be a module-level function (it is pickled by reference). Each rank starts
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, as torchrun would set them,
and returns a picklable value (tensors included). An exception on any rank fails the test with
that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: Sequence[Any]):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    warnings.filterwarnings("ignore")  # megatron-core warns about absent apex/TE on every import
    # Two cores shared by all ranks: more intra-op threads only adds contention.
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = ()) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(fn, world_size, free_port(), out_dir, tuple(args)),
            nprocs=world_size, join=True, start_method="spawn",
        )
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]
