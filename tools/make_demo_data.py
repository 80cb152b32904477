#!/usr/bin/env python3
"""The corpus `make demo` trains on: the Python standard library's sources, Llama-3 tokens.

    python tools/make_demo_data.py --help

The code is megatron_prolong/tools/make_demo_data.py (also installed as the console script ``prolong-make-demo-data``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.make_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
