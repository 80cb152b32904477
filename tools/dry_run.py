#!/usr/bin/env python3
"""One training step of one rank of a GPU job on this CPU, on fake tensors: memory, FLOPs, collectives (docs/dry_run.md).

    python tools/dry_run.py --help

The code is megatron_prolong/tools/dry_run.py (also installed as the console script ``prolong-dry-run``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.dry_run import main

if __name__ == "__main__":
    sys.exit(main())
