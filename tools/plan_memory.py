#!/usr/bin/env python3
"""Per-GPU memory of a long-context layout, and the layouts that fit (docs/long_context.md).

    python tools/plan_memory.py --help

The code is megatron_prolong/tools/plan_memory.py (also installed as the console script ``prolong-plan-memory``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
