"""Datasets, packing, mixtures and SFT masks; the batch contract lives in ``batch.py``.

Public entry points (the trainer imports exactly these)::

    from megatron_prolong.data.config import DataConfig
    from megatron_prolong.data import build_train_dataset, order_global_batch

Heavy dependencies (megatron-core, streaming, tokenizers) are imported lazily by the functions that
need them, so importing this package is cheap.
"""

from .dataset import BlendedDataset, PackedDataset, build_train_dataset, order_global_batch

__all__ = ["BlendedDataset", "PackedDataset", "build_train_dataset", "order_global_batch"]
