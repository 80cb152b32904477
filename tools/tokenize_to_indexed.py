#!/usr/bin/env python3
"""Raw text (jsonl / parquet / text) -> a Megatron indexed dataset (docs/data.md).

    python tools/tokenize_to_indexed.py --help

The code is megatron_prolong/tools/tokenize_to_indexed.py (also installed as the console script ``prolong-tokenize-to-indexed``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.tokenize_to_indexed import main

if __name__ == "__main__":
    sys.exit(main())
