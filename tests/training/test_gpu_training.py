"""bf16 training on CUDA through the trainer: the loss falls, and a save/resume continues exactly.

Each run is ``trainer.train(load_config(None, overrides))`` in a fresh process (one rank, NCCL),
as on a cluster: the portable path (flex_attention) always, also with the 512K settings (full
recompute, chunked loss head), and the TE path when Transformer Engine is importable.

Why the resumed losses must equal the uninterrupted run's bit for bit (tolerance 0): with one
rank and dropout off, a step is a fixed function of (weights, fp32 main weights, Adam moments,
LR schedule, data position), which a checkpoint stores exactly, and every kernel on these paths
gives the same bits for the same inputs on the same GPU: cuBLAS GEMMs (no atomics unless asked
for), flex_attention's Triton forward and backward (dQ and dK/dV are written by separate programs,
the GQA heads of one KV head summed inside one program: no atomics; compiled without autotuning,
so every process runs the same kernel configuration), megatron's cross-entropy (index writes to
distinct rows; the chunked loss head's one scatter-add per row), torch's reductions, the embedding
backward (ordered per feature column) and AdamW. TE's cuDNN attention
backward may accumulate dQ with atomics by default; the TE case sets
``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0`` (TE then keeps cuDNN's deterministic workspace path on
sm90). The first steps of the interrupted run are compared with the reference too: if two
identical runs already differ there, a kernel is nondeterministic, not the resume.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest

from tests.dist import run_distributed

pytestmark = pytest.mark.gpu

STEPS = 30
SAVE_AT = 15
BASE = [
    # llama3-debug with 64-wide heads (flex_attention and cuDNN take them everywhere).
    "model.name=llama3-debug",
    "model.overrides={hidden_size: 256, ffn_hidden_size: 512, num_attention_heads: 4, num_query_groups: 2}",
    "data.mock=true", "train.device=cuda", "train.precision=bf16",
    f"train.steps={STEPS}", "train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=4",
    "optim.lr=3e-3", "optim.warmup_ratio=0.0", "logging.interval=5",
]
PATHS = {
    "portable": (["model.transformer_engine=off"], {}),
    # The 512K settings: full recompute and the chunked loss head (its bf16 CUDA weight gradient).
    "portable-recompute-ce-chunks": (["model.transformer_engine=off", "train.recompute=full",
                                      "model.loss_chunk_tokens=64"], {}),
    "te": (["model.transformer_engine=on"], {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}),
}
_TE = pytest.param("te", marks=pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                                  reason="Transformer Engine is not importable"))


def _train(overrides: list[str], env: dict):
    os.environ.update(env)  # before TE is imported
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training import trainer
    from megatron_prolong.training.run import decide_for_machine

    cfg = load_config(None, BASE + overrides)
    try:
        result = trainer.train(cfg)
    finally:
        destroy()
    return result, decide_for_machine(cfg)


_REFERENCE: dict = {}


def _reference(path: str):
    """The uninterrupted run of ``path``, trained once per session."""
    if path not in _REFERENCE:
        overrides, env = PATHS[path]
        _REFERENCE[path] = run_distributed(_train, 1, (overrides, env))[0]
    return _REFERENCE[path]


def _curve(result) -> list[float]:
    return [result.losses[s] for s in sorted(result.losses)]


@pytest.mark.parametrize("path", ["portable", "portable-recompute-ce-chunks", _TE])
def test_bf16_training_loss_falls(path):
    result, decisions = _reference(path)
    assert decisions.device_type == "cuda" and decisions.bf16
    assert decisions.attention_backend == ("te" if path == "te" else "flex")  # flex: no silent fallback
    assert decisions.use_te == (path == "te")
    losses = _curve(result)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    # Mock documents count upward: learnable. fp32 on CPU reaches 0.73x of the start in 30 steps.
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, losses


@pytest.mark.parametrize("path", ["portable", _TE])
def test_resume_continues_exactly(path, tmp_path):
    overrides, env = PATHS[path]
    reference, _ = _reference(path)
    save = overrides + [f"checkpoint.save_dir={tmp_path}"]
    first, _ = run_distributed(_train, 1, (save + [f"train.exit_at_step={SAVE_AT}"], env))[0]
    assert first.interrupted and first.iteration == SAVE_AT
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == str(SAVE_AT)
    second, _ = run_distributed(_train, 1, (save, env))[0]
    assert sorted(second.losses) == list(range(SAVE_AT + 1, STEPS + 1))

    for step in range(1, SAVE_AT + 1):
        assert first.losses[step] == reference.losses[step], (
            f"two identical {path} runs differ at step {step} ({first.losses[step]!r} vs "
            f"{reference.losses[step]!r}): a nondeterministic kernel, so the exact resume check cannot hold")
    for step in range(SAVE_AT + 1, STEPS + 1):
        a, b = second.losses[step], reference.losses[step]
        assert a == b, (f"step {step} after resuming at {SAVE_AT}: {a!r} != uninterrupted {b!r} "
                        f"(rel {abs(a - b) / abs(b):.2e}); the kernels are deterministic (steps 1-{SAVE_AT} "
                        "matched), so the checkpoint restored something inexactly")


LISTED_SYNCS_PER_STEP = 4
"""docs/gpu.md's review list for a portable-path step: the loss read, megatron's gradient norm,
the agreed non-finite decision and megatron's token-count check (the dry run counts the same)."""


def _step_syncs(overrides: list[str]) -> list[list[str]]:
    """Where each step of three waits for the GPU (``torch.cuda.set_sync_debug_mode``): one list
    of ``file:line`` per step, data preparation included."""
    import warnings

    import numpy as np
    import torch

    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer, build_scheduler
    from megatron_prolong.training.step import train_step
    from megatron_prolong.training.trainer import step_batches

    class Packed:  # two documents per sample, the second over the CP chunks
        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            return {"tokens": rng.integers(1, 500, 256), "labels": rng.integers(1, 500, 256),
                    "loss_mask": np.ones(256, np.float32), "cu_seqlens": np.array([0, 40 + i % 7, 256], np.int32)}

    cfg = load_config(None, BASE + overrides)
    run = resolve_run(cfg)
    try:
        model = build_model(cfg, run)
        optimizer = build_optimizer(cfg, run, model)
        scheduler = build_scheduler(cfg, optimizer)
        steps = []
        for step in range(3):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train_step(model, optimizer, scheduler, step_batches(cfg, run, Packed(), 4 * step, None),
                               num_microbatches=4, seq_length=256, micro_batch_size=1, global_batch_size=4,
                               device=run.device)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            steps.append([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])
        return steps
    finally:
        destroy()


@pytest.mark.parametrize("path", ["portable", "portable-recompute-ce-chunks"])
def test_step_host_syncs_are_the_listed_ones(path):
    steps = run_distributed(_step_syncs, 1, (PATHS[path][0],))[0]
    for syncs in steps[1:]:  # the first step compiles flex_attention
        assert len(syncs) <= LISTED_SYNCS_PER_STEP, syncs
