#!/usr/bin/env python3
"""ProLong MDS shards (raw or compressed) -> Megatron indexed datasets, one per domain (docs/data.md).

    python tools/mds_to_indexed.py --help

The code is megatron_prolong/tools/mds_to_indexed.py (also installed as the console script ``prolong-mds-to-indexed``);
this file only runs its main(). Needs the package importable (``make install``, or ``pip install -e .``).
"""

import sys

from megatron_prolong.tools.mds_to_indexed import main

if __name__ == "__main__":
    sys.exit(main())
