"""Process groups, context-parallel batch split, loss reduction across DP x CP."""

from .state import destroy, initialize

__all__ = ["initialize", "destroy"]
