"""Named Llama-3 architectures. Every test uses the tiny flavours; recipes name the real ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-3-architecture decoder: GQA, RMSNorm, SwiGLU, RoPE, untied embeddings, no biases."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA)."""
    vocab_size: int = 128256
    rotary_base: float = 500_000.0
    """RoPE theta. ProLong raises it per stage (8e6 at 64K, 1.28e8 at 512K)."""
    rope_scaling: bool = False
    """Llama-3.1 frequency scaling (low 1, high 4, original context 8192)."""
    rope_scaling_factor: float = 8.0
    max_position_embeddings: int = 8192
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **overrides) -> "ModelSpec":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def params_per_layer(self) -> int:
        """QKV, output projection, SwiGLU MLP and the two norms of one decoder layer."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_query_groups * self.head_dim
        return h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h

    def num_parameters(self) -> int:
        """Whole model: layers, untied input and output embeddings, final norm."""
        return self.num_layers * self.params_per_layer() + 2 * self.vocab_size * self.hidden_size + self.hidden_size


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size")
"""The fields that set the weights' shapes: a checkpoint's weights load only into these."""
ARCHITECTURE_FIELDS = SHAPE_FIELDS + ("rope_scaling", "rope_scaling_factor", "norm_epsilon")
"""The fields that set the function computed (RoPE's base aside, which each ProLong stage raises)."""


def architecture_differences(spec: ModelSpec, other: ModelSpec) -> list[str]:
    """``field (spec's value vs other's)`` for every architecture field where they differ (the
    scaling factor only where either scales RoPE)."""
    return [f"{f} ({getattr(spec, f)!r} vs {getattr(other, f)!r})" for f in ARCHITECTURE_FIELDS
            if getattr(spec, f) != getattr(other, f)
            and not (f == "rope_scaling_factor" and not spec.rope_scaling and not other.rope_scaling)]


_LLAMA3_8B = ModelSpec("llama3-8b", 32, 4096, 14336, 32, 8)

MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _LLAMA3_8B,
        _LLAMA3_8B.replace(name="llama3.1-8b", rope_scaling=True, max_position_embeddings=131072),
        ModelSpec("llama3-70b", 80, 8192, 28672, 64, 8),
        ModelSpec("llama3.2-1b", 16, 2048, 8192, 32, 8, rope_scaling=True, rope_scaling_factor=32.0,
                  max_position_embeddings=131072),
        # Debug flavours: the same architecture, small enough for CPU tests.
        ModelSpec("llama3-tiny", 2, 64, 192, 4, 2, max_position_embeddings=131072),
        ModelSpec("llama3-debug", 4, 64, 128, 4, 2, vocab_size=512, max_position_embeddings=131072),
    )
}


def get_model_spec(name: str, **overrides) -> ModelSpec:
    """The named spec, with field overrides (e.g. ``rotary_base=8e6``)."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return spec.replace(**overrides) if overrides else spec


def list_models() -> list[str]:
    return sorted(MODELS)
