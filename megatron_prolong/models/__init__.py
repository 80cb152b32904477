"""Named Llama-3 configs -> TransformerConfig + GPTModel; layer spec choice (TE or portable)."""

from .builder import build_gpt_model, build_transformer_config, te_available
from .registry import MODELS, ModelSpec, get_model_spec, list_models

__all__ = ["MODELS", "ModelSpec", "build_gpt_model", "build_transformer_config", "get_model_spec",
           "list_models", "te_available"]
