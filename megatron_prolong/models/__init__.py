"""Named Llama-3 configs -> TransformerConfig + GPTModel; layer spec choice (TE or portable).

The registry imports nothing heavy; the builder (megatron-core) loads on first use, so config
checks and planning tools start fast.
"""

from .registry import MODELS, ModelSpec, get_model_spec, list_models

__all__ = ["MODELS", "ModelSpec", "build_gpt_model", "build_transformer_config", "get_model_spec",
           "list_models"]


def __getattr__(name):
    if name in ("build_gpt_model", "build_transformer_config"):
        from . import builder

        return getattr(builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
