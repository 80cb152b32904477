#!/usr/bin/env python3
"""Perplexity by position and needle retrieval of a checkpoint, at any TP/PP/CP (docs/evaluation.md).

    python tools/evaluate.py --help
    torchrun --nproc-per-node 8 tools/evaluate.py --checkpoint CKPT --output OUT --tp 2 --cp 4

The code is megatron_prolong/tools/evaluate.py (also installed as the console script ``prolong-evaluate``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
