#!/usr/bin/env python3
"""Chat jsonl -> Llama-3 chat template + assistant-only loss mask, indexed (docs/data.md).

    python tools/make_sft_data.py --help

The code is megatron_prolong/tools/make_sft_data.py (also installed as the console script ``prolong-make-sft-data``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.make_sft_data import main

if __name__ == "__main__":
    sys.exit(main())
