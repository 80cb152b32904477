"""Process groups, context-parallel layout and batch split, loss reduction across DP x CP.

``cp_layout`` is light (config checks import it); ``initialize`` / ``destroy`` load megatron-core
on first use.
"""

__all__ = ["initialize", "destroy"]


def __getattr__(name):
    if name in __all__:
        from . import state

        return getattr(state, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
