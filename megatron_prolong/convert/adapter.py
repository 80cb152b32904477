"""The one Hugging Face Llama <-> megatron-core weight mapping, used in both directions.

Every Megatron tensor corresponds to one or more HF tensors (a :class:`WeightGroup`):

=============================================================  =====================================
megatron-core (dist-checkpoint key; ``[L, ...]`` stacked)       Hugging Face ``LlamaForCausalLM``
=============================================================  =====================================
embedding.word_embeddings.weight                               model.embed_tokens.weight
decoder.layers.self_attention.linear_qkv.layer_norm_weight     model.layers.{i}.input_layernorm.weight
decoder.layers.self_attention.linear_qkv.weight                q_proj, k_proj, v_proj (fused, below)
decoder.layers.self_attention.linear_proj.weight               model.layers.{i}.self_attn.o_proj.weight
decoder.layers.mlp.linear_fc1.layer_norm_weight                model.layers.{i}.post_attention_layernorm.weight
decoder.layers.mlp.linear_fc1.weight                           [gate_proj; up_proj]
decoder.layers.mlp.linear_fc2.weight                           model.layers.{i}.mlp.down_proj.weight
decoder.final_layernorm.weight                                 model.norm.weight
output_layer.weight                                            lm_head.weight
=============================================================  =====================================

Facts this relies on (checked against megatron-core 0.16.1):

* In a dist checkpoint, layer tensors are stacked over a leading layer axis (global layer
  numbers, so the PP layout does not matter) and TP shards are re-assembled by the loader, so
  the stored tensor is the full TP=1 tensor.
* The local layer spec (separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules) saves its
  norms under the TE spec's fused names (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``), so one set of checkpoint keys serves both specs.
  :func:`module_param_name` gives the in-memory parameter names of either spec.
* ``linear_qkv`` rows are grouped per KV head: for each query group ``g``, that group's
  ``heads_per_group`` query heads, then its key head, then its value head. TP splits whole
  groups, so this layout holds at every TP.
* ``linear_fc1`` rows are ``[gate; up]`` (megatron's SwiGLU computes ``silu(x1) * x2`` on the two
  halves); its sharded factory keeps that order globally at any TP.
* HF's ``rotate_half`` RoPE is megatron's ``rotary_interleaved=False``, so q/k rows need no
  permutation (unlike the Meta reference checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.registry import ModelSpec

FUSE_COPY = "copy"
FUSE_QKV = "qkv"
FUSE_GATE_UP = "gate_up"


@dataclass(frozen=True)
class WeightGroup:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron_key: str
    """Key inside the dist checkpoint (without any outer prefix)."""
    hf_names: tuple[str, ...]
    """HF parameter names; ``{i}`` stands for the layer number."""
    per_layer: bool
    fuse: str = FUSE_COPY
    local_name: str | None = None
    """In-memory parameter name under the local (non-TE) spec when it differs (``{i}``: layer)."""
    te_name: str | None = None
    """In-memory parameter name under the TE spec when it differs (``{i}``: layer)."""


_LAYER = "model.layers.{i}."

WEIGHT_GROUPS: tuple[WeightGroup, ...] = (
    WeightGroup("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), per_layer=False),
    WeightGroup("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                (_LAYER + "input_layernorm.weight",), per_layer=True,
                local_name="decoder.layers.{i}.input_layernorm.weight"),
    WeightGroup("decoder.layers.self_attention.linear_qkv.weight",
                (_LAYER + "self_attn.q_proj.weight", _LAYER + "self_attn.k_proj.weight",
                 _LAYER + "self_attn.v_proj.weight"), per_layer=True, fuse=FUSE_QKV),
    WeightGroup("decoder.layers.self_attention.linear_proj.weight",
                (_LAYER + "self_attn.o_proj.weight",), per_layer=True),
    WeightGroup("decoder.layers.mlp.linear_fc1.layer_norm_weight",
                (_LAYER + "post_attention_layernorm.weight",), per_layer=True,
                local_name="decoder.layers.{i}.pre_mlp_layernorm.weight"),
    WeightGroup("decoder.layers.mlp.linear_fc1.weight",
                (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), per_layer=True,
                fuse=FUSE_GATE_UP),
    WeightGroup("decoder.layers.mlp.linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",), per_layer=True),
    WeightGroup("decoder.final_layernorm.weight", ("model.norm.weight",), per_layer=False),
    WeightGroup("output_layer.weight", ("lm_head.weight",), per_layer=False),
)

# ``_extra_state`` entries (ShardedObjects) that megatron-core 0.16.1 asks a checkpoint for when
# loading our GPTModel, read from its sources (see tests/convert/te_spec_keys.py for the TE spec's
# list with references). A load fails on any it asks for and does not find, and ignores entries
# nobody asks for, so the converter writes the union of both specs (as ``None``: TE's and
# megatron's ``set_extra_state`` accept None as "no FP8 state").
#
# Per layer (stacked over the layer axis: one object per layer), both specs: megatron's
# Column/RowParallelLinear define ``get_extra_state`` (None, "compatibility with TE"), TE's
# LayerNormLinear / Linear carry their FP8 metadata there. Core attention carries none in either
# spec: TEDotProductAttention.sharded_state_dict returns no ``_extra_state`` (only the learnable
# softmax offset when softmax_type='learnable'), and the portable core attention has none.
LAYER_EXTRA_STATE_MODULES: tuple[str, ...] = (
    "decoder.layers.self_attention.linear_qkv",
    "decoder.layers.self_attention.linear_proj",
    "decoder.layers.mlp.linear_fc1",
    "decoder.layers.mlp.linear_fc2",
)
# Not per layer (one object, global shape (1,)), TE spec only: its final norm is TENorm ->
# ``te.pytorch.RMSNorm``, a TE fusible op whose ``get_extra_state`` holds quantizer state; the
# local spec's torch RMSNorm has none. (``output_layer._extra_state`` is dropped by GPTModel.)
MODEL_EXTRA_STATE_MODULES: tuple[str, ...] = ("decoder.final_layernorm",)


def extra_state_objects(num_layers: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int | None]]:
    """``(key, global_shape, global_offset, layer)`` of every ``_extra_state`` ShardedObject a
    checkpoint of a ``num_layers`` model must hold (layer: None for a non-layer object)."""
    out = []
    for layer in range(num_layers):
        for module in LAYER_EXTRA_STATE_MODULES:
            out.append((f"{module}._extra_state", (num_layers,), (layer,), layer))
    for module in MODEL_EXTRA_STATE_MODULES:
        out.append((f"{module}._extra_state", (1,), (0,), None))
    return out


# HF checkpoints sometimes carry non-persistent buffers; they are recomputed from the config.
IGNORED_HF_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


class LlamaWeightAdapter:
    """Shapes and HF <-> Megatron transforms of every weight of one :class:`ModelSpec`.

    Works on one layer's tensor at a time (without the stacked layer axis), so callers can
    stream a model of any size.
    """

    groups: tuple[WeightGroup, ...] = WEIGHT_GROUPS

    def __init__(self, spec: ModelSpec):
        if spec.hidden_size % spec.num_attention_heads:
            raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by "
                             f"num_attention_heads {spec.num_attention_heads}")
        if spec.num_attention_heads % spec.num_query_groups:
            raise ValueError(f"num_attention_heads {spec.num_attention_heads} is not divisible by "
                             f"num_query_groups (num_key_value_heads) {spec.num_query_groups}")
        self.spec = spec
        self.head_dim = spec.head_dim
        self.heads_per_group = spec.num_attention_heads // spec.num_query_groups

    # ----------------------------------------------------------------- names and shapes
    def group(self, megatron_key: str) -> WeightGroup:
        for g in self.groups:
            if g.megatron_key == megatron_key:
                return g
        raise KeyError(megatron_key)

    @staticmethod
    def hf_names(group: WeightGroup, layer: int | None = None) -> list[str]:
        return [n.format(i=layer) for n in group.hf_names]

    def all_hf_names(self) -> list[str]:
        """Every HF tensor name of the model, in the order HF itself lists them."""
        names = self.hf_names(self.groups[0])
        for layer in range(self.spec.num_layers):
            for g in self.groups:
                if g.per_layer:
                    names += self.hf_names(g, layer)
        for g in self.groups[1:]:
            if not g.per_layer:
                names += self.hf_names(g)
        return names

    def megatron_shape(self, group: WeightGroup) -> tuple[int, ...]:
        """Shape of one layer's (or the whole, for non-layer tensors) Megatron tensor at TP=1."""
        s = self.spec
        h, f, d = s.hidden_size, s.ffn_hidden_size, self.head_dim
        shapes = {
            "embedding.word_embeddings.weight": (s.vocab_size, h),
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
            "decoder.layers.self_attention.linear_qkv.weight":
                ((s.num_attention_heads + 2 * s.num_query_groups) * d, h),
            "decoder.layers.self_attention.linear_proj.weight": (h, s.num_attention_heads * d),
            "decoder.layers.mlp.linear_fc1.layer_norm_weight": (h,),
            "decoder.layers.mlp.linear_fc1.weight": (2 * f, h),
            "decoder.layers.mlp.linear_fc2.weight": (h, f),
            "decoder.final_layernorm.weight": (h,),
            "output_layer.weight": (s.vocab_size, h),
        }
        return shapes[group.megatron_key]

    def megatron_global_shape(self, group: WeightGroup) -> tuple[int, ...]:
        """Shape of the tensor stored in the dist checkpoint (layer axis first for layer tensors)."""
        shape = self.megatron_shape(group)
        return (self.spec.num_layers, *shape) if group.per_layer else shape

    def hf_shapes(self, group: WeightGroup) -> list[tuple[int, ...]]:
        s = self.spec
        h, f, d = s.hidden_size, s.ffn_hidden_size, self.head_dim
        if group.fuse == FUSE_QKV:
            return [(s.num_attention_heads * d, h), (s.num_query_groups * d, h), (s.num_query_groups * d, h)]
        if group.fuse == FUSE_GATE_UP:
            return [(f, h), (f, h)]
        return [self.megatron_shape(group)]

    @staticmethod
    def module_param_name(group: WeightGroup, layer: int | None = None, *, use_te: bool = False) -> str:
        """The parameter's name in ``GPTModel.state_dict()`` under the TE or the local spec."""
        template = (group.te_name if use_te else group.local_name) or group.megatron_key.replace(
            "decoder.layers.", "decoder.layers.{i}.")
        return template.format(i=layer)

    # ----------------------------------------------------------------- transforms
    def to_megatron(self, group: WeightGroup, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """HF tensor(s) of one layer -> that layer's Megatron tensor (exact: only reshapes/copies)."""
        expected = self.hf_shapes(group)
        got = [tuple(t.shape) for t in hf_tensors]
        if got != expected:
            raise ValueError(f"{self.hf_names(group, 0 if group.per_layer else None)}: expected shapes "
                             f"{expected}, got {got}")
        if group.fuse == FUSE_QKV:
            q, k, v = hf_tensors
            ng, hpg, d, h = self.spec.num_query_groups, self.heads_per_group, self.head_dim, self.spec.hidden_size
            # Per query group: its hpg query heads, then its key head, then its value head.
            fused = torch.cat([q.reshape(ng, hpg * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], dim=1)
            return fused.reshape(ng * (hpg + 2) * d, h)
        if group.fuse == FUSE_GATE_UP:
            return torch.cat(hf_tensors, dim=0)
        return hf_tensors[0]

    def to_hf(self, group: WeightGroup, tensor: torch.Tensor) -> list[torch.Tensor]:
        """One layer's Megatron tensor -> the HF tensor(s) (contiguous, same dtype)."""
        if tuple(tensor.shape) != self.megatron_shape(group):
            raise ValueError(f"{group.megatron_key}: expected shape {self.megatron_shape(group)}, "
                             f"got {tuple(tensor.shape)}")
        if group.fuse == FUSE_QKV:
            ng, hpg, d, h = self.spec.num_query_groups, self.heads_per_group, self.head_dim, self.spec.hidden_size
            grouped = tensor.reshape(ng, (hpg + 2) * d, h)
            q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
            return [q.reshape(ng * hpg * d, h).contiguous(), k.reshape(ng * d, h).contiguous(),
                    v.reshape(ng * d, h).contiguous()]
        if group.fuse == FUSE_GATE_UP:
            return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
        return [tensor.contiguous()]

    # ----------------------------------------------------------------- whole-model helpers
    def hf_to_megatron_state_dict(self, hf_state: dict[str, torch.Tensor], *, use_te: bool = False
                                  ) -> dict[str, torch.Tensor]:
        """An in-memory HF state dict -> a TP=1/PP=1 ``GPTModel.state_dict()`` (small models/tests)."""
        out = {}
        for g in self.groups:
            for layer in (range(self.spec.num_layers) if g.per_layer else [None]):
                out[self.module_param_name(g, layer, use_te=use_te)] = self.to_megatron(
                    g, [hf_state[n] for n in self.hf_names(g, layer)])
        return out
