"""Dry run: one training step of one rank of the real job on a CPU, with fake tensors (shape,
dtype, device; no data) - device, dtype and shape bugs, memory, FLOPs and collectives at the
recipe's full scale without a GPU. See docs/dry_run.md.

    from megatron_prolong.dryrun import dry_run
    result = dry_run(cfg, world_size=64, rank=0)
"""

from .observe import DryRunError, DtypeError
from .run import DRYRUN_OVERRIDES, MOCK_DATA_OVERRIDES, DryRunResult, dry_run, pick_rank

__all__ = ["DRYRUN_OVERRIDES", "MOCK_DATA_OVERRIDES", "DryRunError", "DryRunResult", "DtypeError", "dry_run",
           "pick_rank"]
