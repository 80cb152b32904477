"""``tools/evaluate.py``: long-context evaluation of a trainer checkpoint with the training model.

    python tools/evaluate.py --checkpoint CKPT --output OUT                      # one process
    torchrun --nproc-per-node 8 tools/evaluate.py --checkpoint CKPT --output OUT --tp 2 --cp 4

The checkpoint is loaded at any TP / PP / CP layout (ranks beyond TP x PP x CP are data parallel
and split the work); every forward goes through the training path (``engine.ForwardScorer``).
Tasks: perplexity by position over long documents, and needle retrieval on a grid of context
length x depth. Argument and checkpoint problems are reported before anything heavy is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint_layout import CheckpointError, model_spec_from_meta, read_checkpoint_meta, resolve_checkpoint
from ..models.registry import ModelSpec
from ..parallel.cp_layout import check_seq_length

TASKS = ("ppl", "needle")
NEEDLE_TASKS = ("auto", "passkey", "kv")
MIN_DEFAULT_LENGTH = 64
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEMO = REPO_ROOT / "demo" / "data" / "stdlib_text"
"""The corpus ``make demo`` builds (``tools/make_demo_data.py``): the default text when present."""
PASSKEY_PROBE = " The pass key is 71432. What is the pass key? 0123456789"


class UsageError(ValueError):
    """A bad command line; the message says what to pass instead."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="trainer checkpoint folder (with iter_*/)")
    p.add_argument("--output", required=True, type=Path, help="folder for results.json, plots, summary.txt")
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: latest)")
    p.add_argument("--data", default=None,
                   help="indexed dataset prefix (.bin/.idx) for long documents and haystacks (default: the demo "
                        f"corpus {_rel(DEFAULT_DEMO)} when it fits the vocabulary, else built-in text or random "
                        "tokens)")
    p.add_argument("--lengths", type=_int_list, default=None,
                   help="context lengths of the needle grid, e.g. 8192,32768,65536 (default: powers of two "
                        "from 1/16 of the trained context up to it)")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--samples-per-cell", type=int, default=4, help="needle cases per length x depth (default 4)")
    p.add_argument("--needle-task", choices=NEEDLE_TASKS, default="auto",
                   help="passkey (text, needs a tokenizer) or kv (token-level key-value pairs); auto: passkey "
                        "when a tokenizer for the model's vocabulary is available (Llama-3's ships offline)")
    p.add_argument("--num-needles", type=int, default=4,
                   help="kv task: needles per case (1 asked, the rest distractors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for the passkey text (default: Llama-3's)")
    p.add_argument("--ppl-length", type=int, default=None,
                   help="window of the position curve (default: the longest length)")
    p.add_argument("--ppl-documents", type=int, default=8, help="windows for the position curve (default 8)")
    p.add_argument("--tasks", type=_task_list, default=list(TASKS), help="ppl,needle (default: both)")
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="allow lengths beyond the context the checkpoint was trained on")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--loss-chunk-tokens", type=int, default=None,
                   help="output layer + cross-entropy in chunks of this many tokens (default: 2048 above 16K "
                        "tokens, else 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the needle cases and document choice")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="further trainer config overrides, e.g. parallel.cp_comm_type=a2a (repeatable)")
    return p



def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 2, got {text!r}")
    return sorted(set(values))


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return sorted(set(values))


def _task_list(text: str) -> list[str]:
    tasks = [t for t in text.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"tasks are {','.join(TASKS)}, got {text!r}")
    return tasks


# ------------------------------------------------------------------------------------------------
# The request, checked without torch
# ------------------------------------------------------------------------------------------------


@dataclass
class Request:
    args: argparse.Namespace
    meta: dict
    spec: ModelSpec
    iteration: int
    trained_length: int
    lengths: list[int]
    ppl_length: int

    @property
    def max_length(self) -> int:
        return max(self.lengths + [self.ppl_length])


def trained_length(meta: dict, spec: ModelSpec) -> int:
    """The context the checkpoint was trained at: the run's ``train.seq_length`` where the trainer
    recorded it, else the model's ``max_position_embeddings`` (a converted Hugging Face model)."""
    seq = ((meta.get("train_state") or {}).get("config") or {}).get("train", {}).get("seq_length")
    return int(seq) if seq else int(spec.max_position_embeddings)


def default_lengths(trained: int) -> list[int]:
    """Powers of two from ``trained / 16`` (at least 64) up to the trained context, which is
    always included."""
    lo = max(MIN_DEFAULT_LENGTH, trained // 16)
    out, p = [], 1
    while p <= trained:
        if p >= lo:
            out.append(p)
        p *= 2
    if not out or out[-1] != trained:
        out.append(trained)
    return out


def check_request(args: argparse.Namespace) -> Request:
    """Everything that can be checked from the arguments and the checkpoint's metadata."""
    path, iteration = resolve_checkpoint(args.checkpoint, args.iteration)
    meta = read_checkpoint_meta(args.checkpoint, iteration)
    spec = model_spec_from_meta(meta, where=str(path))
    trained = trained_length(meta, spec)
    lengths = args.lengths or default_lengths(trained)
    ppl_length = args.ppl_length or max(lengths)
    too_long = [n for n in sorted(set(lengths + [ppl_length])) if n > trained]
    if too_long and not args.allow_extrapolation:
        raise UsageError(f"lengths {too_long} exceed the context {args.checkpoint} was trained on ({trained} tokens); "
                         f"choose --lengths/--ppl-length up to {trained}, or pass --allow-extrapolation to "
                         "measure beyond it")
    for n in sorted(set(lengths + [ppl_length])):
        try:
            check_seq_length(n, args.cp, args.tp, False, what="evaluation length")
        except ValueError as e:
            raise UsageError(f"{e} (--cp {args.cp}); choose --lengths / --ppl-length accordingly") from None
    for name in ("tp", "pp", "cp", "samples_per_cell", "ppl_documents", "num_needles"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    world, model_parallel = int(os.environ.get("WORLD_SIZE", "1")), args.tp * args.pp * args.cp
    if world % model_parallel:
        raise UsageError(f"{world} process(es) cannot hold TP x PP x CP = {args.tp} x {args.pp} x {args.cp}; "
                         f"launch a multiple of {model_parallel} "
                         f"(torchrun --nproc-per-node {model_parallel} tools/evaluate.py ...)")
    if args.data is not None:
        for ext in (".bin", ".idx"):
            if not Path(f"{args.data}{ext}").is_file():
                raise UsageError(f"--data {args.data}: {args.data}{ext} does not exist (give the indexed dataset "
                                 "prefix, without .bin/.idx)")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} exists and is not a folder")
    return Request(args=args, meta=meta, spec=spec, iteration=iteration, trained_length=trained,
                   lengths=lengths, ppl_length=ppl_length)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def eval_config(req: Request, world_size: int):
    """A trainer ``Config`` that builds the checkpoint's model at the requested layout."""
    import yaml

    from ..config import load_config

    a, spec = req.args, req.spec
    fields = {k: v for k, v in vars(spec).items() if k != "name"}
    dp = max(1, world_size // (a.tp * a.pp * a.cp))
    chunk = a.loss_chunk_tokens if a.loss_chunk_tokens is not None else (2048 if req.max_length > 16384 else 0)
    overrides = [
        # The checkpoint's model (init_from below) at this iteration's spec. YAML's own dump: a float
        # such as 1e-05 must come back as a float, not a string.
        f"model.overrides={yaml.safe_dump(fields, default_flow_style=True, width=1 << 30).strip()}",
        f"model.loss_chunk_tokens={chunk}",
        f"parallel.tensor={a.tp}", f"parallel.pipeline={a.pp}", f"parallel.context={a.cp}",
        "data.mock=true",  # the trainer's data section must name a source; evaluation brings its own
        f"train.seq_length={req.max_length}", f"train.global_batch_size={dp}", f"train.device={a.device}",
        f"train.seed={a.seed}", f"checkpoint.init_from={a.checkpoint}",
    ]
    return load_config(None, overrides + list(a.overrides))


def load_model(req: Request):
    """(cfg, run, [model chunk]) with the checkpoint's weights; starts the process groups."""
    from ..training.checkpoint import load_checkpoint
    from ..training.run import resolve_run
    from ..training.setup import build_model_chunk

    cfg = eval_config(req, int(os.environ.get("WORLD_SIZE", "1")))
    run = resolve_run(cfg)
    model = [build_model_chunk(cfg, run)]
    load_checkpoint(req.args.checkpoint, model, iteration=req.iteration)
    return cfg, run, model


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _tokenizer(req: Request):
    """A text tokenizer whose ids fit the model, or None (then the token-level kv task)."""
    from ..data.indexed import LLAMA3_VOCAB_SIZE, DataError
    from ..data.tokenize import TextTokenizer, llama3_tokenizer_dir

    a = req.args
    if a.needle_task == "kv":
        return None
    if a.tokenizer is None and req.spec.vocab_size != LLAMA3_VOCAB_SIZE:
        if a.needle_task == "passkey":
            raise UsageError(f"--needle-task passkey needs a tokenizer for {req.spec.name}'s "
                             f"{req.spec.vocab_size}-token vocabulary: pass --tokenizer, or use --needle-task kv")
        return None
    tok = TextTokenizer(a.tokenizer or llama3_tokenizer_dir())
    top = max(tok.encode([PASSKEY_PROBE])[0])
    if top >= req.spec.vocab_size:
        raise DataError(f"tokenizer {tok.path} produces id {top}, outside {req.spec.name}'s vocabulary of "
                        f"{req.spec.vocab_size}; pass the model's own --tokenizer or use --needle-task kv")
    return tok



def token_source(req: Request, tokenizer, kv_task):
    """(token stream, its documents or None): --data, else the demo corpus, else built-in text (with
    a tokenizer), else random ids (the kv task's haystack range)."""
    from ..data.indexed import DataError
    from .haystack import RandomTokens, indexed_stream, text_stream

    vocab = req.spec.vocab_size
    if req.args.data is not None:
        stream, store = indexed_stream(req.args.data)
        stream.check_vocab(vocab)
        return stream, store
    if Path(f"{DEFAULT_DEMO}.bin").is_file():
        stream, store = indexed_stream(str(DEFAULT_DEMO))
        try:
            stream.check_vocab(vocab)
            return stream, store
        except DataError:
            pass  # the demo corpus is Llama-3 text; a debug vocabulary cannot read it
    if tokenizer is not None:
        return text_stream(tokenizer, req.max_length)
    lo, hi = kv_task.haystack_range if kv_task is not None else (0, vocab)
    return RandomTokens(lo, hi), None


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Everything scored, built before the model is loaded (so bad inputs fail fast)."""

    stream: object
    windows: Optional[list] = None
    """Perplexity windows (``ppl_length + 1`` tokens each)."""
    whole_documents: bool = False
    task: object = None
    cases: Optional[list] = None
    """Needle cases."""


def prepare_inputs(req: Request) -> Inputs:
    import numpy as np

    from .haystack import long_windows
    from .needle import KeyValueTask, PasskeyTask, build_cases

    a = req.args
    tokenizer = _tokenizer(req) if "needle" in a.tasks or a.data is None else None
    task = None
    if "needle" in a.tasks:
        task = PasskeyTask(tokenizer) if tokenizer is not None else KeyValueTask(req.spec.vocab_size, a.num_needles)
    stream, store = token_source(req, tokenizer, task if isinstance(task, KeyValueTask) else None)
    inputs = Inputs(stream=stream, task=task)
    if "ppl" in a.tasks:
        inputs.windows, inputs.whole_documents = long_windows(store, stream, req.ppl_length, a.ppl_documents,
                                                              np.random.default_rng([a.seed, 1]))
    if task is not None:
        try:
            inputs.cases = build_cases(task, stream, req.lengths, a.depths, a.samples_per_cell, a.seed)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return inputs


def run_ppl(req: Request, scorer, inputs: Inputs) -> dict:
    from .perplexity import document_sample, position_edges, summarize

    edges = position_edges(req.ppl_length)
    scores = scorer.score([document_sample(w) for w in inputs.windows], bucket_edges=edges)
    return {"length": req.ppl_length, "documents": len(inputs.windows), "source": inputs.stream.source,
            "whole_documents": inputs.whole_documents, **summarize(scores, edges)}


def run_needle(req: Request, scorer, inputs: Inputs) -> dict:
    from .needle import mean_by_length, retrieval_grid

    a, cases, task = req.args, inputs.cases, inputs.task
    with_choice = all(c.candidates is not None for c in cases)
    scores = scorer.score([c.sample() for c in cases], top1=True,
                          candidates=[c.candidates for c in cases] if with_choice else None)
    cells = retrieval_grid(cases, scores)
    metrics = ["exact_match", "answer_logprob"] + (["choice_accuracy"] if with_choice else [])
    return {"task": task.name, "haystack": inputs.stream.source, "lengths": req.lengths, "depths": a.depths,
            "samples_per_cell": a.samples_per_cell, "cases": len(cases), "chance": task.chance if with_choice else None,
            "cells": cells,
            "by_length": {m: {str(k): v for k, v in mean_by_length(cells, m).items()} for m in metrics}}


def evaluate(req: Request) -> dict:
    """Collective: build the inputs, load the model, run the tasks; every rank returns the same
    results."""
    t0 = time.time()
    inputs = prepare_inputs(req)

    from .engine import ForwardScorer
    from .state import evaluation_mode

    a = req.args
    cfg, run, model = load_model(req)
    scorer = ForwardScorer(model, cfg, run)
    results = {"checkpoint": str(a.checkpoint), "iteration": req.iteration, "model": req.spec.name,
               "model_spec": dataclasses.asdict(req.spec), "trained_length": req.trained_length,
               "layout": f"TP {a.tp} PP {a.pp} CP {a.cp} DP {run.dp_size}", "device": run.device.type,
               "precision": "bf16" if run.bf16 else "fp32"}
    with evaluation_mode(model):
        if inputs.windows is not None:
            results["perplexity_by_position"] = run_ppl(req, scorer, inputs)
        if inputs.cases is not None:
            results["retrieval"] = run_needle(req, scorer, inputs)
    results["seconds"] = time.time() - t0
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        req = check_request(args)
    except (UsageError, CheckpointError) as e:
        if rank0:
            print(f"evaluate.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    from ..errors import USER_ERRORS, report_error
    from ..parallel import destroy
    from .report import summary_text, write_outputs

    try:
        results = evaluate(req)
        if rank0:
            files = write_outputs(results, args.output)
            print(summary_text(results))
            print("wrote " + ", ".join(str(f) for f in files), flush=True)
    except UsageError as e:
        if rank0:
            print(f"evaluate.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except USER_ERRORS as e:
        return report_error(e)
    finally:
        destroy()
    return 0
