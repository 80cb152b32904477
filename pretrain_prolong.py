#!/usr/bin/env python
"""Train a long-context Llama-3 the ProLong way.

    torchrun --nproc-per-node 8 pretrain_prolong.py --config examples/prolong_64k.yaml \\
        checkpoint.save_dir=/ckpt/stage1 train.steps=5000

Everything after ``--config`` is a dotted override (``section.field=value``); see
``megatron_prolong/config.py`` for every field. ``--dry-run --world-size N`` runs one step of one
rank of that N-GPU job on this machine's CPU with fake tensors (docs/dry_run.md).
"""

import argparse
import sys

from megatron_prolong.config import ConfigError, load_config
from megatron_prolong.errors import report_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (examples/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit (nothing is started)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one step of one rank of the job on fake tensors, no GPU (see the options below)")
    from megatron_prolong.tools import dry_run

    dry_run.add_arguments(parser.add_argument_group("dry run"))
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run.run(args.config, args.overrides, args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return report_error(e)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from megatron_prolong.platform import quiet_known_warnings

    quiet_known_warnings()  # before megatron-core loads: it warns at import
    from megatron_prolong.errors import USER_ERRORS
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.trainer import train

    try:
        train(cfg)
    except USER_ERRORS as e:
        return report_error(e)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
