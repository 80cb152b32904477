"""megatron-prolong: long-context continued pre-training of Llama-3 on megatron-core."""

__version__ = "0.1.0"
