"""Evaluation inside a training run must leave the run as it found it."""

from __future__ import annotations

import contextlib

import torch

from .. import platform


@contextlib.contextmanager
def evaluation_mode(model: list):
    """Model chunks in eval mode under ``no_grad``; afterwards their train/eval flags and every
    random generator the training step draws from (torch CPU, CUDA, megatron's model-parallel RNG
    tracker) are back to what they were, so a run with evaluation on trains exactly like one
    with it off."""
    saved = platform.rng_states()
    modes = [chunk.training for chunk in model]
    try:
        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(model, modes):
            chunk.train(mode)
        platform.set_rng_states(saved)
