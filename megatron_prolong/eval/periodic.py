"""Validation during training: the ``eval`` config section on ``data.valid_blend``.

The trainer builds one ``PeriodicEvaluator`` (``build_periodic_evaluator``, None when there is no
validation data) and calls ``evaluate(step)`` when ``due(step)``. The validation set is the first
``eval.samples`` samples of the validation datasets, packed like training data at
``train.seq_length`` and mixed by their weights: the same samples every time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import Config
from ..data import build_train_dataset
from .engine import ForwardScorer
from .state import evaluation_mode


@dataclass
class ValidationResult:
    step: int
    loss: float
    """Token-averaged over every validation sample (the training loss's definition)."""
    tokens: int
    domains: dict[str, float] = field(default_factory=dict)
    """Token-averaged loss per validation dataset (short name)."""

    def line(self) -> str:
        parts = [f"eval step {self.step:>6} | loss {self.loss:.4f} | ppl {_ppl(self.loss):.2f} | "
                 f"{self.tokens:,} tokens"]
        if len(self.domains) > 1:
            parts.append(", ".join(f"{name} {loss:.4f}" for name, loss in self.domains.items()))
        return " | ".join(parts)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def short_names(prefixes: list[str]) -> list[str]:
    """Dataset names for the report: the prefixes' file names without a shared ``stem.`` (the
    domains of ``valid_data_prefix``), or the prefixes themselves where file names collide."""
    names = [Path(p).name for p in prefixes]
    if len(set(names)) != len(names):
        return list(prefixes)
    cut = os.path.commonprefix(names).rfind(".") + 1 if len(names) > 1 else 0
    return [n[cut:] for n in names]


class PeriodicEvaluator:
    def __init__(self, cfg: Config, run, model: list, log, entries: list[dict]):
        t = cfg.train
        self.interval, self.at_end, self.last_step = cfg.eval.interval, cfg.eval.at_end, t.steps
        self.model, self.log = model, log
        valid_data = dataclasses.replace(cfg.data, blend=entries, mixture=None, data_prefix=None, mock=False,
                                         valid_blend=None, valid_data_prefix=None)
        num = cfg.eval_samples()
        dataset = build_train_dataset(valid_data, seq_length=t.seq_length, seed=t.seed,
                                      vocab_size=run.spec.vocab_size, num_samples=num, log=log.info)
        self.samples = [dataset[i] for i in range(num)]  # small (a few global batches); read once
        names = short_names([e["prefix"] for e in entries])
        by_prefix = dict(zip((e["prefix"] for e in entries), names))
        self.domain_of = [by_prefix[dataset.source(i)] if hasattr(dataset, "source") else names[0]
                          for i in range(num)]
        self.names = names
        self.scorer = ForwardScorer(model, cfg, run, micro_batch_size=t.micro_batch_size)

    def due(self, step: int) -> bool:
        return bool((self.interval and step % self.interval == 0) or (self.at_end and step == self.last_step))

    def evaluate(self, step: int) -> ValidationResult:
        """Collective: every rank calls it; every rank gets the same result."""
        with evaluation_mode(self.model):
            scores = self.scorer.score(self.samples)
        domains = {}
        for name in self.names:
            idx = [i for i, d in enumerate(self.domain_of) if d == name]
            tokens = float(scores.sample_tokens[idx].sum())
            if tokens:
                domains[name] = float(scores.sample_loss[idx].sum()) / tokens
        result = ValidationResult(step=step, loss=scores.loss, tokens=int(scores.tokens), domains=domains)
        self.log.info(result.line())
        if self.log.writer is not None:
            self.log.writer.add_scalar("eval/loss", result.loss, step)
            self.log.writer.add_scalar("eval/ppl", _ppl(result.loss), step)
            for name, loss in domains.items():
                self.log.writer.add_scalar(f"eval/loss/{name}", loss, step)
        return result


def build_periodic_evaluator(cfg: Config, run, model: list, log) -> Optional[PeriodicEvaluator]:
    """The run's evaluator, or None when no validation data is configured (or nothing is due)."""
    entries = cfg.data.valid_entries()
    if not entries or not (cfg.eval.interval or cfg.eval.at_end):
        return None
    return PeriodicEvaluator(cfg, run, model, log, entries)
