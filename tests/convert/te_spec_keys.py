"""What megatron-core 0.16.1's TE layer spec asks a checkpoint for when our GPTModel loads it
(``GPTModel.sharded_state_dict()`` with homogeneous layers), derived from the sources because TE
cannot be imported on a CPU machine. The gpu-marked test in test_extra_state.py checks this list
against a real TE model.

Sources (megatron-core 0.16.1 under site-packages, TE at tags v2.9, v2.10, v2.11):

* ``models/gpt/gpt_layer_specs.py: get_gpt_layer_with_transformer_engine_spec()`` (no MoE, no
  qk-norm): ``self_attention.linear_qkv`` = TELayerNormColumnParallelLinear,
  ``self_attention.core_attention`` = TEDotProductAttention, ``self_attention.linear_proj`` =
  TERowParallelLinear, ``mlp.linear_fc1`` = TELayerNormColumnParallelLinear, ``mlp.linear_fc2`` =
  TERowParallelLinear; input_layernorm / pre_mlp_layernorm / q,k_layernorm are IdentityOp.
* ``transformer/transformer_block.py: _get_block_submodules``: a layer ModuleSpec gets
  ``layer_norm=LayerNormImpl`` = TENorm when TE imports; ``extensions/transformer_engine.py:
  TENorm.__new__`` returns ``te.pytorch.RMSNorm`` for normalization='RMSNorm'.
* ``extensions/transformer_engine.py``: TELayerNormColumnParallelLinear / TERowParallelLinear
  ``.sharded_state_dict`` -> ``make_sharded_tensors_for_checkpoint(self.state_dict(...))``, which
  wraps every ``*_extra_state`` in a ShardedObject (``transformer/utils.py``); TE's
  ``TransformerEngineBaseModule.get_extra_state`` (module/base.py) makes ``_extra_state`` part of
  ``state_dict()``. ``TEDotProductAttention.sharded_state_dict`` uses an *empty* state dict unless
  ``config.softmax_type == 'learnable'``: no core_attention entry.
* ``te.pytorch.RMSNorm`` (module/rmsnorm.py) subclasses ``ops.basic.RMSNorm`` ->
  ``ops.op.BasicOperation``, which defines ``get_extra_state`` (quantizer state). TENorm has no
  ``sharded_state_dict``, so ``transformer/utils.py: sharded_state_dict_default`` wraps its
  ``state_dict()``: ``decoder.final_layernorm.weight`` and ``decoder.final_layernorm._extra_state``,
  with no sharded offsets -> ShardedObject of global shape (1,) at offset (0,).
* ``transformer/transformer_block.py: TransformerBlock.sharded_state_dict`` stacks layer entries
  under ``decoder.layers.`` with a ``(0, layer, num_layers)`` offset; ShardedObject.unique_key is
  ``{key}/shard_{offset}_{shape}`` (dist_checkpointing/mapping.py).
* ``models/gpt/gpt_model.py: GPTModel.sharded_state_dict`` drops ``output_layer._extra_state``.
"""

from __future__ import annotations

TE_LAYER_TENSORS = (
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.self_attention.linear_qkv.weight",
    "decoder.layers.self_attention.linear_proj.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.mlp.linear_fc1.weight",
    "decoder.layers.mlp.linear_fc2.weight",
)
TE_MODEL_TENSORS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")
TE_LAYER_EXTRA_STATE = (
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2._extra_state",
)
TE_MODEL_EXTRA_STATE = ("decoder.final_layernorm._extra_state",)


def te_spec_checkpoint_keys(num_layers: int) -> set[str]:
    """Tensor keys and ShardedObject unique keys the TE-spec GPTModel loads."""
    keys = set(TE_LAYER_TENSORS) | set(TE_MODEL_TENSORS)
    keys |= {f"{k}/shard_{layer}_{num_layers}" for k in TE_LAYER_EXTRA_STATE for layer in range(num_layers)}
    keys |= {f"{k}/shard_0_1" for k in TE_MODEL_EXTRA_STATE}
    return keys
