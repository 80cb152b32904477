"""HF <-> Megatron checkpoint conversion for Llama-3 (one weight-mapping adapter, both directions).

* :mod:`.adapter` - the weight mapping (names, shapes, QKV / gate-up fusion), both directions.
* :mod:`.hf_config` - HF ``config.json`` <-> :class:`~megatron_prolong.models.ModelSpec`.
* :mod:`.token_ids` - which bos / eos / pad ids and generation config an export gets.
* :mod:`.hf_to_megatron` / :mod:`.megatron_to_hf` - the streaming pipelines behind
  ``tools/convert_checkpoint.py``.
* :mod:`.dist_io` / :mod:`.safetensors_stream` - tensor-at-a-time checkpoint I/O.
"""

from .adapter import WEIGHT_GROUPS, LlamaWeightAdapter, WeightGroup
from .hf_config import UnsupportedModelError, hf_config_from_spec, spec_from_hf_config
from .hf_to_megatron import ConversionError, hf_to_megatron
from .megatron_to_hf import megatron_to_hf

__all__ = ["WEIGHT_GROUPS", "ConversionError", "LlamaWeightAdapter", "UnsupportedModelError", "WeightGroup",
           "hf_config_from_spec", "hf_to_megatron", "megatron_to_hf", "spec_from_hf_config"]
