"""A retrieval case whose answer is known: train a tiny model on synthetic key-value needles with
the real trainer, then score it (and its untrained initial weights) with the real harness.

Used by ``tests/eval/test_retrieval_learned.py`` (200 steps) and ``benchmarks/bench_retrieval.py``
(longer, more lengths). Collective: call from every rank of a (CPU) run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class KnownAnswerRun:
    untrained: str
    """Checkpoint of the initial weights."""
    trained: str
    losses: list[float]
    """Training loss per step."""
    span: int
    """Value tokens the answer is drawn from (choice chance = 1 / span)."""


def recipe(seq_length: int, steps: int, batch: int, lr: float) -> list[str]:
    """The trainer overrides: llama3-debug on CPU, loss on the answers only (SFT packing)."""
    return ["model.name=llama3-debug", "model.rotary_base=8e6", "train.device=cpu", f"train.seq_length={seq_length}",
            f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", f"train.steps={steps}",
            "train.seed=3", f"optim.lr={lr}", "optim.weight_decay=0.0", "optim.warmup_ratio=0.05",
            "logging.interval=1000000", "data.sft=true"]


def train_known_answer_model(root: str, *, steps: int = 200, seq_length: int = 64, num_needles: int = 1,
                             batch: int = 32, lr: float = 5e-3, seed: int = 0) -> KnownAnswerRun:
    """Write ``steps x batch`` training windows, save the initial weights, train, save."""
    from ..config import load_config
    from ..training import trainer
    from ..training.checkpoint import save_checkpoint
    from ..training.run import resolve_run
    from ..training.setup import build_model
    from .haystack import RandomTokens
    from .needle import KeyValueTask, write_needle_dataset

    root = str(Path(root))
    task = KeyValueTask(512, num_needles=num_needles)
    write_needle_dataset(task, RandomTokens(*task.haystack_range), f"{root}/kv", length=seq_length,
                         count=steps * batch, seed=seed)
    overrides = recipe(seq_length, steps, batch, lr) + [f"data.blend={{{root}/kv: 1.0}}"]
    cfg = load_config(None, overrides)
    run = resolve_run(cfg)
    save_checkpoint(f"{root}/untrained", 0, build_model(cfg, run), model_spec=run.spec,
                    train_state={"config": cfg.to_dict()})
    result = trainer.train(load_config(None, overrides + [f"checkpoint.init_from={root}/untrained",
                                                          f"checkpoint.save_dir={root}/trained"]))
    return KnownAnswerRun(untrained=f"{root}/untrained", trained=f"{root}/trained",
                          losses=[result.losses[s] for s in sorted(result.losses)], span=task.span)


def score_retrieval(checkpoint: str, *, lengths: Sequence[int], num_needles: int = 1, samples_per_cell: int = 16,
                    seed: int = 99, extra: Sequence[str] = ()) -> dict:
    """``tools/evaluate.py``'s retrieval results for ``checkpoint`` (kv task; ``seed`` differs from
    the training windows', so the cases are new to the model)."""
    from . import runner

    args = runner.build_parser().parse_args(
        ["--checkpoint", checkpoint, "--output", "unused", "--tasks", "needle", "--needle-task", "kv",
         "--num-needles", str(num_needles), "--lengths", ",".join(map(str, lengths)),
         "--samples-per-cell", str(samples_per_cell), "--seed", str(seed)] + list(extra))
    return runner.evaluate(runner.check_request(args))["retrieval"]
