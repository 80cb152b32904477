#!/usr/bin/env python3
"""Hugging Face Llama <-> trainer checkpoints, streamed, exact (docs/convert.md).

    python tools/convert_checkpoint.py --help

The code is megatron_prolong/tools/convert_checkpoint.py (also installed as the console script ``prolong-convert-checkpoint``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
