"""Datasets, packing, mixtures and SFT masks; the batch contract lives in ``batch.py``."""
