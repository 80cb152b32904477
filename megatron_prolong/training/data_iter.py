"""Which samples this rank trains on at a given step, as prepared micro-batches.

Sample ``i`` of the run is ``dataset[i]``: step ``k`` uses samples ``[k*G, (k+1)*G)`` for a global
batch of ``G``. Resuming therefore needs only the number of consumed samples. Within a global
batch, micro-batch ``m`` of data-parallel rank ``d`` takes positions ``(m*D + d)*M ...`` (``M``
micro batch, ``D`` DP size), so with length-sorted ordering the ranks' m-th micro-batches have
similar attention cost.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..data.batch import collate
from .. import platform
from ..parallel.context_parallel import move_prepared, prepare_batch


def rank_micro_batch_indices(start: int, global_batch: int, micro_batch: int, dp_rank: int,
                             dp_size: int, order=None) -> list[list[int]]:
    indices = list(range(start, start + global_batch))
    if order is not None:
        indices = list(order(indices))
    step = micro_batch * dp_size
    return [indices[m + dp_rank * micro_batch: m + (dp_rank + 1) * micro_batch]
            for m in range(0, global_batch, step)]


def micro_batches(dataset, index_groups: list[list[int]], *, device: torch.device, cp_size: int,
                  cp_rank: int, use_te: bool, tp_size: int = 1, sequence_parallel: bool = False
                  ) -> Iterator[dict]:
    """Each group of samples collated and prepared for this rank on the host (the preparation reads
    document boundaries: on the device each read would wait for the GPU), then copied to ``device``."""
    for group in index_groups:
        with platform.host_side():
            prepared = prepare_batch(collate([dataset[i] for i in group]), cp_size=cp_size, cp_rank=cp_rank,
                                     use_te=use_te, tp_size=tp_size, sequence_parallel=sequence_parallel)
        yield move_prepared(prepared, device)
