"""Long-context evaluation of a trainer checkpoint (``megatron_prolong.eval.runner``; docs/evaluation.md)."""

import sys

from ..eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
