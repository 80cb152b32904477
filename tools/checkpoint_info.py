#!/usr/bin/env python3
"""What a save directory holds; --verify reads every tensor (docs/fault_tolerance.md).

    python tools/checkpoint_info.py --help

The code is megatron_prolong/tools/checkpoint_info.py (also installed as the console script ``prolong-checkpoint-info``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.checkpoint_info import main

if __name__ == "__main__":
    sys.exit(main())
