"""Dry run: one training step of one rank of the real job, on a CPU, with fake tensors.

    python tools/dry_run.py --config examples/prolong_512k.yaml --world-size 64
    python pretrain_prolong.py --config examples/prolong_64k.yaml --dry-run --world-size 64 --rank last
    python tools/dry_run.py --config examples/prolong_512k.yaml --world-size 8 parallel.context=4

Builds the recipe's model, optimizer and batch for rank ``--rank`` (default 0; ``last``: the
first rank of the last pipeline stage, which holds the loss) of a ``--world-size``-GPU job and
runs forward, backward and the optimizer step with tensors that have shape, dtype and device but
no data, on torch's fake process group. Prints memory by category next to ``memory_plan``,
FLOPs next to the analytic formula, collectives by group, GEMM dtypes and host syncs; fails
(exit 1) where the GPU run would (device or dtype mix, a data-dependent shape), or on an fp32
GEMM in a bf16 run. See docs/dry_run.md. Nothing is read from or written to checkpoints; the
recipe's data is used when its files are here, else synthetic samples of the same length.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, help="GPUs of the simulated job (e.g. 64)")
    parser.add_argument("--rank", default="0", help="rank to simulate: an integer, or `last` (first rank of the "
                        "last pipeline stage)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--fail-off-plan", action="store_true",
                        help="exit 1 when memory_plan and the dry run differ by more than 10%%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args.config, args.overrides, args)


def run(config, overrides: list[str], args) -> int:
    """Load the recipe for a dry run, run it and print the report; the exit code."""
    from ..config import ConfigError
    from ..errors import USER_ERRORS, report_error

    if args.world_size is None:
        return report_error(ConfigError("a dry run needs --world-size, the number of GPUs of the job it simulates"))
    try:
        cfg, note = load_for_dry_run(config, overrides)
    except ConfigError as e:
        return report_error(e)
    from ..dryrun import DryRunError, dry_run, report
    from ..platform import quiet_known_warnings

    quiet_known_warnings()
    if note:
        print(note, flush=True)
    try:
        result = dry_run(cfg, args.world_size, args.rank)
    except USER_ERRORS as e:
        return report_error(e)
    except DryRunError as e:
        print(f"dry run failed: {e}", file=sys.stderr, flush=True)
        return 1
    print(report.format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(result), f, indent=1, default=str)
    off = report.off_plan(result)
    if off and args.fail_off_plan:
        print(f"memory_plan is off by more than 10% on: {', '.join(off)}", file=sys.stderr, flush=True)
        return 1
    return 0


def load_for_dry_run(config, overrides: list[str]):
    """The recipe with ``DRYRUN_OVERRIDES`` (no checkpoints, logs or evaluation) and, when its
    data files are not here, synthetic samples of the same length. Returns (config, note)."""
    from ..config import load_config
    from ..data.indexed import check_prefix_exists
    from ..dryrun.run import DRYRUN_OVERRIDES, MOCK_DATA_OVERRIDES

    cfg = load_config(config, list(overrides) + DRYRUN_OVERRIDES)
    if cfg.data.mock:
        return cfg, None
    try:
        for entry in cfg.data.blend_entries():
            check_prefix_exists(entry["prefix"])
    except FileNotFoundError as e:
        note = f"data: {e.args[0].split('. ')[0]}; the dry run uses synthetic samples of the same length"
        return load_config(config, list(overrides) + DRYRUN_OVERRIDES + MOCK_DATA_OVERRIDES), note
    return cfg, None


if __name__ == "__main__":
    raise SystemExit(main())
