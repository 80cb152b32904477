#!/usr/bin/env python
"""Long-context evaluation of a trainer checkpoint, with the training model at any TP/PP/CP.

  python tools/evaluate.py --checkpoint CKPT --output OUT
  torchrun --nproc-per-node 8 tools/evaluate.py --checkpoint CKPT --output OUT --tp 2 --cp 4 \\
      --data data/valid/book-524288 --lengths 65536,131072,262144,524288

Writes OUT/results.json, OUT/ppl_by_position.png, OUT/retrieval_heatmap.png and OUT/summary.txt
(also printed). See docs/evaluation.md and ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prolong.eval.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
