#!/usr/bin/env python
"""Full training steps on one GPU: megatron-prolong next to Hugging Face Llama as ProLong trains it.

    python benchmarks/bench_train.py --out bench_out                  # GPU: 64K, 128K, 512K
    python benchmarks/bench_train.py --seq-lengths 64k --layers 4     # one configuration
    python benchmarks/bench_train.py --device cpu --tiny --out /tmp/b # CPU smoke: llama3-debug, seq 128

Every configuration (sequence length x framework) runs in its own subprocess, so an OOM or a crash
costs that row only. Results: a table on stdout, ``bench_train.json`` / ``bench_train.csv`` and
the workers' combined output ``bench_train.log`` under ``--out``.

What runs (one optimizer step = forward, backward and optimizer over ``--global-batch`` samples
of ``S`` tokens, micro-batch 1):

- ours: the trainer's own objects, built from a Config exactly as ``training/trainer.py`` builds
  them (``resolve_run`` -> ``build_model`` / ``build_optimizer`` / ``build_scheduler``,
  ``step_batches`` -> ``train_step``): llama3-8b layer geometry with ``--layers`` layers, bf16
  with fp32 main grads and megatron's distributed optimizer (AdamW, fp32 master weights), full
  activation recompute, 2,048-token chunked cross-entropy, document-masked attention (TE when
  importable, else the portable flex_attention kernel).
- hf: ``transformers.LlamaForCausalLM`` of the same geometry (random init), as ProLong's HF
  Trainer with ``bf16=True`` runs it on one GPU: fp32 weights under ``torch.autocast(bfloat16)``,
  ``torch.optim.AdamW`` (fp32 states; weight decay off for norms), gradient clipping 1.0,
  gradient checkpointing per layer, ProLong's logits in 2,048-token checkpointed blocks, and the
  same document masks (flex_attention block mask, else SDPA with a 4-D boolean mask).

FLOPs: ``megatron_prolong.flops.training_flops`` (model FLOPs: recompute not counted; training =
3 x forward; document-masked and causal-dense attention pairs).
MFU = FLOPs / step time / ``--peak-tflops`` (H100 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_prolong.flops import training_flops
from megatron_prolong.memory_plan import GiB, Layout, MemoryOptions, estimate
from megatron_prolong.models.registry import ModelSpec, get_model_spec

ROOT = Path(__file__).resolve().parents[1]

H100_BF16_DENSE_TFLOPS = 989.0
RESULT_NAMES = ("bench_train.json", "bench_train.csv", "bench_train.log")

# ------------------------------------------------------------------------------------------------
# Document-length mixes
# ------------------------------------------------------------------------------------------------

# Sample kinds and their shares, after ProLong's data mixes (PROLONG_RECIPE.md). A ProLong sample
# comes from one domain: a long-data sample is a window of one long document (code repository or
# book, filtered to documents at least the window long); a short-data sample packs many short
# documents (FineWeb(-Edu), StackExchange, Wikipedia, Tulu, ArXiv, OpenWebMath).
MIXES = {
    # Stage 1 (64K): code repos 30% + books 30% + textbooks 3% long, 37% short.
    "prolong-64k": (("whole", 0.63), ("short", 0.37)),
    # Stage 2 (512K): code 15% + books 5% + textbooks 3% at the full length, code 15% + books 25%
    # as 64K documents, 37% short.
    "prolong-512k": (("whole", 0.23), ("64k-docs", 0.40), ("short", 0.37)),
}
SHORT_SIGMA = 1.25
"""Short documents: log-normal lengths, median ``short_median(S)`` (1,024 tokens for S >= 64K),
sigma 1.25: mean about 2.2K tokens, 1% longer than 19K (web text, Q&A, Wikipedia, papers)."""
_GOLDEN = (math.sqrt(5) - 1) / 2


def default_mix(seq_length: int) -> str:
    return "prolong-64k" if seq_length <= 65536 else "prolong-512k"


def short_median(seq_length: int) -> int:
    return int(min(1024, max(8, seq_length // 64)))


def sample_kind(mix: str, index: int) -> str:
    """Kind of sample ``index``: a low-discrepancy (golden-ratio) sequence over the mix's shares,
    so any few consecutive samples follow the shares closely and every run sees the same ones."""
    u = (0.5 + index * _GOLDEN) % 1.0
    acc = 0.0
    for kind, share in MIXES[mix]:
        acc += share
        if u < acc:
            return kind
    return MIXES[mix][-1][0]


def document_lengths(kind: str, seq_length: int, rng: np.random.Generator) -> list[int]:
    if kind == "whole":
        return [seq_length]
    if kind == "64k-docs":
        n = min(65536, seq_length)
        return [n] * (seq_length // n) + ([seq_length % n] if seq_length % n else [])
    if kind != "short":
        raise ValueError(f"unknown sample kind {kind!r}")
    lengths, total = [], 0
    while total < seq_length:
        n = int(np.clip(rng.lognormal(math.log(short_median(seq_length)), SHORT_SIGMA), 1, seq_length))
        n = min(n, seq_length - total)  # the last document is cut at the sample's end
        lengths.append(n)
        total += n
    return lengths


class LengthMixDataset:
    """Packed samples in the trainer's batch contract (``megatron_prolong.data.batch``): random
    tokens, documents from a mix of ``MIXES``, no loss on a document's first token."""

    def __init__(self, seq_length: int, vocab_size: int, mix: str, seed: int = 0):
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}; choose one of {sorted(MIXES)}")
        self.seq_length, self.vocab_size, self.mix, self.seed = seq_length, vocab_size, mix, seed

    def __len__(self) -> int:
        return 1 << 30

    def lengths(self, index: int) -> list[int]:
        rng = np.random.default_rng([self.seed, index, 0])
        return document_lengths(sample_kind(self.mix, index), self.seq_length, rng)

    def __getitem__(self, index: int) -> dict:
        lengths = self.lengths(index)
        stream = np.random.default_rng([self.seed, index, 1]).integers(
            0, self.vocab_size, self.seq_length + 1, dtype=np.int64)
        starts = np.cumsum([0] + lengths[:-1])
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        loss_mask[starts[1:] - 1] = 0.0  # position i predicts token i+1: never across documents
        cu = np.concatenate([starts, [self.seq_length]]).astype(np.int32)
        return {"tokens": stream[:-1], "labels": stream[1:], "loss_mask": loss_mask, "cu_seqlens": cu}


# ------------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------------


@dataclass
class Job:
    framework: str
    """``ours`` or ``hf``."""
    model: str
    layers: int
    seq_length: int
    mix: str
    global_batch: int
    warmup: int
    steps: int
    device: str
    recompute: str
    loss_chunk_tokens: int
    transformer_engine: str
    hf_attention: str
    peak_tflops: float
    seed: int = 0
    planned_gib: Optional[float] = None
    """The memory plan's total for ours at these settings (GPU runs)."""
    predicted_oom: bool = False

    @property
    def name(self) -> str:
        return f"{_k(self.seq_length)}-{self.framework}-L{self.layers}"

    def spec(self) -> ModelSpec:
        return get_model_spec(self.model, num_layers=self.layers, rotary_base=rotary_base(self.seq_length))


def rotary_base(seq_length: int) -> float:
    """ProLong's RoPE theta for the stage that trains this length."""
    return 8e6 if seq_length <= 65536 else 1.28e8


def memory_plan(spec: ModelSpec, seq_length: int, *, global_batch: int, recompute: str, loss_chunk_tokens: int,
                attention_backend: str) -> dict:
    """What ``megatron_prolong.memory_plan`` predicts for one GPU (GiB, by component and total)."""
    est = estimate(spec, Layout(1, 1, 1, 1), MemoryOptions(
        seq_length=seq_length, micro_batch_size=1, num_microbatches=global_batch, sequence_parallel=False,
        recompute=recompute, loss_chunk_tokens=loss_chunk_tokens, attention_backend=attention_backend,
        checkpoint_window_bytes=0))  # the benchmark saves no checkpoint
    return {k: round(v, 2) for k, v in est.as_gib().items()}


class StepTimer:
    """Wall time of whole steps, with the device synchronised on both sides."""

    def __init__(self, device):
        self.device = device
        self.seconds: list[float] = []

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self._sync()
            self.seconds.append(time.perf_counter() - self._t0)
        return False


def _summarise(job: Job, spec: ModelSpec, dataset: LengthMixDataset, timer: StepTimer,
               losses: list[float], device, extra: dict) -> dict:
    timed = range(job.warmup * job.global_batch, (job.warmup + job.steps) * job.global_batch)
    samples = [dataset.lengths(i) for i in timed]
    flops = training_flops(spec, job.seq_length, samples)
    step_s = timer.seconds[job.warmup:]
    total = sum(step_s)
    out = {
        "status": "ok", "losses": losses, "step_seconds": timer.seconds,
        "median_step_s": sorted(step_s)[len(step_s) // 2],
        "tokens_per_s": flops["tokens"] / total,
        "tflops_doc": flops["doc"] / total / 1e12, "tflops_causal": flops["causal"] / total / 1e12,
        "doc_pair_fraction": flops["doc_pairs"] / flops["causal_pairs"],
        "timed_sample_kinds": [sample_kind(job.mix, i) for i in timed],
        "timed_documents": sum(len(s) for s in samples),
        "params": spec.num_parameters(),
    }
    out["mfu_doc"] = out["tflops_doc"] / job.peak_tflops
    out["mfu_causal"] = out["tflops_causal"] / job.peak_tflops
    out.update(_memory(device))
    out.update(extra)
    return out


def _memory(device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    import torch

    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB}


# ------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ------------------------------------------------------------------------------------------------


def our_overrides(job: Job) -> list[str]:
    """The Config of the run: what a recipe would say for this benchmark row."""
    return [
        f"model.name={job.model}", f"model.overrides={{num_layers: {job.layers}}}",
        f"model.rotary_base={rotary_base(job.seq_length)}", f"model.loss_chunk_tokens={job.loss_chunk_tokens}",
        f"model.transformer_engine={job.transformer_engine}",
        "data.mock=true",  # the benchmark serves its own LengthMixDataset to the same batch pipeline
        f"train.device={job.device}", f"train.seq_length={job.seq_length}", "train.micro_batch_size=1",
        f"train.global_batch_size={job.global_batch}", f"train.steps={job.warmup + job.steps}",
        f"train.recompute={job.recompute}", "optim.warmup_ratio=0.0",
    ]


def run_ours(job: Job) -> dict:
    from megatron_prolong import platform
    from megatron_prolong.config import load_config
    from megatron_prolong.parallel import destroy
    from megatron_prolong.training.run import resolve_run
    from megatron_prolong.training.setup import build_model, build_optimizer, build_scheduler
    from megatron_prolong.training.step import train_step
    from megatron_prolong.training.trainer import step_batches

    platform.quiet_known_warnings()
    cfg = load_config(None, our_overrides(job))
    run = resolve_run(cfg)
    try:
        model = build_model(cfg, run)
        optimizer = build_optimizer(cfg, run, model)
        scheduler = build_scheduler(cfg, optimizer)
        d = run.decisions
        print(f"[ours] {run.spec.name} x {run.spec.num_layers} layers | {'bf16' if d.bf16 else 'fp32'} | "
              f"attention {d.attention_backend} | TE {d.te_version if d.use_te else 'off'} | recompute "
              f"{cfg.train.recompute} | loss chunk {cfg.model.loss_chunk_tokens}", flush=True)
        dataset = LengthMixDataset(job.seq_length, run.spec.vocab_size, job.mix, job.seed)
        timer, losses = StepTimer(run.device), []
        G = job.global_batch
        for step in range(job.warmup + job.steps):
            batches = step_batches(cfg, run, dataset, step * G, None)
            with timer:
                out = train_step(model, optimizer, scheduler, batches, num_microbatches=G,
                                 seq_length=job.seq_length, micro_batch_size=1, global_batch_size=G,
                                 device=run.device)
            losses.append(out.loss)
            print(f"[ours] step {step + 1}: {timer.seconds[-1]:.3f} s, loss {out.loss:.4f}"
                  f"{' (warmup)' if step < job.warmup else ''}", flush=True)
        return _summarise(job, run.spec, dataset, timer, losses, run.device, {
            "attention": d.attention_backend, "te_version": d.te_version, "bf16": d.bf16,
            "plan_gib": memory_plan(run.spec, job.seq_length, global_batch=G, recompute=cfg.train.recompute,
                                    loss_chunk_tokens=cfg.model.loss_chunk_tokens,
                                    attention_backend=d.attention_backend)})
    finally:
        destroy()


def hf_attention_name(requested: str, device_type: str) -> str:
    """flex_attention where it can train (CUDA), else SDPA; what ``requested`` asks otherwise."""
    if requested == "auto":
        if device_type != "cuda":
            return "sdpa"  # flex_attention has no CPU backward
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return "sdpa"
        return "flex"
    return requested


def hf_llama_config(spec: ModelSpec, seq_length: int):
    from transformers import LlamaConfig

    # transformers 5 keeps RoPE settings in rope_parameters; 4.x takes rope_theta.
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base}}
            if hasattr(LlamaConfig(), "rope_parameters") else {"rope_theta": spec.rotary_base})
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups, hidden_act="silu",
        max_position_embeddings=max(seq_length, spec.max_position_embeddings), rms_norm_eps=spec.norm_epsilon,
        initializer_range=spec.init_method_std, tie_word_embeddings=False, use_cache=False,
        attention_bias=False, mlp_bias=False, **rope)


_HF_FLEX = "flex_attention_autocast"


def _register_hf_flex() -> None:
    """transformers' flex_attention under a name that first brings Q, K and V to one dtype.

    Under autocast with fp32 weights, HF's Llama applies RoPE with fp32 cos/sin, so Q and K reach
    the kernel in fp32 while V is bf16; SDPA is cast by autocast, flex_attention only by newer
    torch releases. This does that cast (to the autocast dtype), nothing else."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        if torch.is_autocast_enabled(query.device.type):
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_HF_FLEX, forward)


def hf_document_mask(doc_ids, kernel: str):
    """Causal within documents, nothing across: a flex BlockMask, or a [1, 1, S, S] boolean mask
    (True = attend). HF uses a 4-D mask as given (``masking_utils``: 4.57 and 5.x)."""
    import torch

    S = doc_ids.shape[-1]
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        # Compiled on CUDA (long sequences); eager elsewhere (tests on CPU, short).
        return create_block_mask(mask_mod, doc_ids.shape[0], None, S, S, device=doc_ids.device,
                                 _compile=doc_ids.is_cuda)
    pos = torch.arange(S, device=doc_ids.device)
    return ((pos[:, None] >= pos[None, :]) & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def run_hf(job: Job) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers
    from torch.utils.checkpoint import checkpoint
    from transformers import LlamaForCausalLM

    from megatron_prolong.data.batch import collate

    device = torch.device("cuda", 0) if job.device == "cuda" else torch.device("cpu")
    spec = job.spec()
    torch.manual_seed(job.seed)
    with torch.device(device):  # initialise on the GPU: 8B-geometry layers are slow to init on CPU
        model = LlamaForCausalLM(hf_llama_config(spec, job.seq_length))
    model.float()  # HF Trainer bf16=True: fp32 weights, compute under autocast
    kernel = hf_attention_name(job.hf_attention, device.type)
    if kernel == "flex":
        _register_hf_flex()
    model.set_attn_implementation(_HF_FLEX if kernel == "flex" else "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # HF Trainer's parameter groups: no weight decay on norms (and biases, which Llama has none of).
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-5, betas=(0.9, 0.95), eps=1e-8)  # ProLong: --optim adamw_torch
    bf16 = device.type == "cuda"
    print(f"[hf] transformers {transformers.__version__} LlamaForCausalLM x {spec.num_layers} layers | "
          f"{'fp32 weights + bf16 autocast' if bf16 else 'fp32'} | attention {model.config._attn_implementation} | "
          f"gradient checkpointing | loss blocks {job.loss_chunk_tokens}", flush=True)

    def block_loss(hidden, labels):
        return F.cross_entropy(model.lm_head(hidden), labels, ignore_index=-100, reduction="sum")

    dataset = LengthMixDataset(job.seq_length, spec.vocab_size, job.mix, job.seed)
    position_ids = torch.arange(job.seq_length, device=device)[None]
    timer, losses = StepTimer(device), []
    G, chunk = job.global_batch, job.loss_chunk_tokens or job.seq_length
    for step in range(job.warmup + job.steps):
        with timer:  # data preparation included, as in ours (step_batches runs inside train_step)
            batch = collate([dataset[i] for i in range(step * G, (step + 1) * G)])
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, -100)
            loss_tokens = batch["loss_mask"].sum()  # the loss is averaged over the global batch's tokens
            loss_sum = 0.0
            for m in range(G):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    mask = hf_document_mask(batch["doc_ids"][m:m + 1], kernel)
                    hidden = model.model(input_ids=batch["tokens"][m:m + 1], attention_mask=mask,
                                         position_ids=position_ids, use_cache=False).last_hidden_state[0]
                    # ProLong's memory-efficient loss: logits of one block at a time, recomputed in backward.
                    loss = sum(checkpoint(block_loss, hidden[s:s + chunk], labels[m, s:s + chunk], use_reentrant=False)
                               for s in range(0, job.seq_length, chunk))
                (loss / loss_tokens).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss_sum / loss_tokens))
        print(f"[hf] step {step + 1}: {timer.seconds[-1]:.3f} s, loss {losses[-1]:.4f}"
              f"{' (warmup)' if step < job.warmup else ''}", flush=True)
    return _summarise(job, spec, dataset, timer, losses, device, {
        "attention": f"{kernel} ({model.config._attn_implementation})", "bf16": bf16,
        "transformers": transformers.__version__})


def worker_main(job_path: str, result_path: str) -> int:
    import torch

    job = Job(**json.loads(Path(job_path).read_text()))
    try:
        result = (run_ours if job.framework == "ours" else run_hf)(job)
        rc = 0
    except Exception as e:  # the driver records what went wrong and goes on with the next row
        oom = isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()
        traceback.print_exc()
        result = {"status": "oom" if oom else "error", "message": f"{type(e).__name__}: {str(e)[:500]}"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            result.update(_memory(torch.device("cuda", torch.cuda.current_device())))
        rc = 1
    Path(result_path).write_text(json.dumps(result))
    return rc


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _installed_version(*names: str) -> Optional[str]:
    """Version of an installed distribution (without importing it: the probe stays fast)."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def probe_main() -> int:
    """Machine facts as JSON on stdout (a subprocess, so the driver never holds a CUDA context)."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0],
            "transformers": _installed_version("transformers"),
            "megatron_core": _installed_version("megatron-core", "megatron_core"),
            "transformer_engine": _installed_version("transformer-engine", "transformer_engine",
                                                     "transformer-engine-torch", "transformer_engine_torch"),
            "flash_attn": _installed_version("flash-attn", "flash_attn"), "triton": _installed_version("triton")}
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / GiB, gpu_count=torch.cuda.device_count(),
                    cuda_runtime=torch.version.cuda)
    print(json.dumps(info))
    return 0


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning,ignore::DeprecationWarning")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def probe() -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe"], capture_output=True, text=True, env=_child_env(),
                         timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"environment probe failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def classify_failure(returncode: Optional[int], log_tail: str, timed_out: bool) -> tuple[str, str]:
    """(status, message) of a worker that wrote no result file."""
    if timed_out:
        return "timeout", "killed at the job time limit"
    lines = [l for l in log_tail.splitlines() if l.strip()]
    last = lines[-1] if lines else f"exit code {returncode}"
    if "out of memory" in log_tail.lower():
        return "oom", last
    return "error", f"exit code {returncode}: {last}"


def run_job(job: Job, out_dir: Path, log, timeout: float) -> dict:
    job_path, result_path = out_dir / f".{job.name}.job.json", out_dir / f".{job.name}.result.json"
    job_path.write_text(json.dumps(dataclasses.asdict(job)))
    result_path.unlink(missing_ok=True)
    log.write(f"\n===== {job.name}: {json.dumps(dataclasses.asdict(job))}\n")
    log.flush()
    start = log.tell()
    t0 = time.time()
    # Own session: on a timeout the whole worker tree (compile workers too) is stopped.
    proc = subprocess.Popen([sys.executable, __file__, "--worker", str(job_path), str(result_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=ROOT, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.flush()
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        with open(log.name, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            tail = f.read()[-4000:]
        status, message = classify_failure(proc.returncode, tail, timed_out)
        result = {"status": status, "message": message}
    for p in (job_path, result_path):
        p.unlink(missing_ok=True)
    result.update(job=dataclasses.asdict(job), wall_s=time.time() - t0)
    return result


def parse_length(text: str) -> int:
    t = text.strip().lower()
    return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def pick_layers(args, seq_length: int, plan_backend: str, gpu_gib: Optional[float]) -> tuple[int, float]:
    """(layers, planned GiB): ``--layers N``, or with ``auto`` the most layers (up to ``--max-layers``)
    whose planned memory fits ``--fit-fraction`` of the GPU (1 when none does)."""
    def planned(n):
        return memory_plan(get_model_spec(args.model, num_layers=n), seq_length, global_batch=args.global_batch,
                           recompute=args.recompute, loss_chunk_tokens=args.loss_chunk_tokens,
                           attention_backend=plan_backend)["total"]

    if args.layers != "auto":
        return int(args.layers), planned(int(args.layers))
    most = min(args.max_layers, get_model_spec(args.model).num_layers)
    if gpu_gib is None:
        return most, planned(most)
    for n in range(most, 0, -1):
        if planned(n) <= args.fit_fraction * gpu_gib:
            return n, planned(n)
    return 1, planned(1)


def build_jobs(args, env: dict) -> list[Job]:
    on_cuda = args.device == "cuda"
    # The plan's guess of the attention the run record will pick (each ours row reports the real one).
    use_te = on_cuda and args.transformer_engine != "off" and env.get("transformer_engine") is not None
    plan_backend = "te" if use_te else ("flex" if on_cuda else "sdpa")
    gpu_gib = env.get("gpu_memory_gib") if on_cuda else None
    jobs = []
    for S in args.seq_lengths:
        layers, planned = pick_layers(args, S, plan_backend, gpu_gib)
        steps = args.steps if args.steps is not None else (3 if S <= 131072 else 1)
        for fw in args.frameworks:
            jobs.append(Job(fw, args.model, layers, S, args.mix or default_mix(S), args.global_batch, args.warmup,
                            steps, args.device, args.recompute, args.loss_chunk_tokens, args.transformer_engine,
                            args.hf_attention, args.peak_tflops, args.seed, planned_gib=planned,
                            predicted_oom=gpu_gib is not None and planned > gpu_gib))
    return jobs


def _fmt(v, spec="", missing="-"):
    return missing if v is None else format(v, spec)


def print_table(results: list[dict], env: dict) -> str:
    rows = []
    head = (f"{'config':<24} {'fw':<5} {'L':>2} {'attention':<20} {'tok/s':>9} {'step s':>7} {'TF/s doc':>9} "
            f"{'MFU doc':>8} {'TF/s cau':>9} {'MFU cau':>8} {'alloc':>6} {'resv':>6} {'plan':>6}  status")
    rows.append(head)
    by_config: dict[tuple, dict] = {}
    for r in results:
        j = r["job"]
        key = (j["seq_length"], j["layers"], j["mix"])
        by_config.setdefault(key, {})[j["framework"]] = r
        ok = r["status"] == "ok"
        plan = (r.get("plan_gib") or {}).get("total")
        status = r["status"] if ok else f"{r['status']}: {r.get('message', '')[:70]}"
        if j.get("predicted_oom"):
            status += " (plan: does not fit)"
        cuda = j["device"] == "cuda"
        rows.append(
            f"{_k(j['seq_length']) + ' ' + j['mix']:<24} {j['framework']:<5} {j['layers']:>2} "
            f"{str(r.get('attention', '-'))[:20]:<20} {_fmt(r.get('tokens_per_s'), ',.0f'):>9} "
            f"{_fmt(r.get('median_step_s'), '.2f'):>7} {_fmt(r.get('tflops_doc'), '.1f'):>9} "
            f"{_fmt(r.get('mfu_doc') if cuda else None, '.1%'):>8} {_fmt(r.get('tflops_causal'), '.1f'):>9} "
            f"{_fmt(r.get('mfu_causal') if cuda else None, '.1%'):>8} {_fmt(r.get('peak_allocated_gib'), '.1f'):>6} "
            f"{_fmt(r.get('peak_reserved_gib'), '.1f'):>6} {_fmt(plan, '.1f'):>6}  {status}")
    notes = []
    for (S, L, mix), fws in by_config.items():
        ours, hf = fws.get("ours"), fws.get("hf")
        ok = [r for r in (ours, hf) if r and r["status"] == "ok"]
        if ok:
            notes.append(f"{_k(S)} {mix}: timed samples {', '.join(ok[0]['timed_sample_kinds'])} "
                         f"({ok[0]['timed_documents']} documents); document-masked attention = "
                         f"{ok[0]['doc_pair_fraction']:.2f} x causal-dense")
        if len(ok) == 2:
            notes.append(f"{_k(S)} {mix}, {L} layers: ours / hf tokens/s = "
                         f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x")
    text = "\n".join(rows + [""] + notes)
    gpu = env.get("gpu") or "cpu"
    print(f"\n{gpu} | torch {env.get('torch')} | transformers {env.get('transformers')} | TE "
          f"{env.get('transformer_engine')} | peak {results[0]['job']['peak_tflops'] if results else '-'} TFLOP/s")
    print(text, flush=True)
    return text


def write_results(out_dir: Path, results: list[dict], env: dict, args) -> None:
    (out_dir / "bench_train.json").write_text(json.dumps(
        {"environment": env, "arguments": {k: v for k, v in vars(args).items()}, "results": results}, indent=1))
    cols = ["seq_length", "mix", "framework", "layers", "status", "attention", "tokens_per_s", "median_step_s",
            "tflops_doc", "mfu_doc", "tflops_causal", "mfu_causal", "doc_pair_fraction", "peak_allocated_gib",
            "peak_reserved_gib", "plan_total_gib", "predicted_oom", "message"]
    with open(out_dir / "bench_train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            j = r["job"]
            flat = {**j, **r, "plan_total_gib": (r.get("plan_gib") or {}).get("total")}
            w.writerow([flat.get(c) for c in cols])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: llama3-debug geometry, seq 128, 1 warmup + 2 timed steps, loss chunks of 32")
    ap.add_argument("--model", default="llama3-8b", help="layer geometry from the registry")
    ap.add_argument("--seq-lengths", nargs="+", type=parse_length, default=None,
                    help="tokens per sample, e.g. 64k 128k 512k (default: those three)")
    ap.add_argument("--layers", default="auto",
                    help="layers of the model, or auto: as many as the memory plan fits (up to --max-layers)")
    ap.add_argument("--max-layers", type=int, default=8)
    ap.add_argument("--fit-fraction", type=float, default=0.92,
                    help="share of the GPU memory the planned total may take with --layers auto")
    ap.add_argument("--frameworks", nargs="+", choices=["ours", "hf"], default=["ours", "hf"])
    ap.add_argument("--mix", choices=sorted(MIXES), default=None,
                    help="document-length mix (default: prolong-64k up to 64K, prolong-512k above)")
    ap.add_argument("--global-batch", type=int, default=1, help="samples per optimizer step (micro-batch 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 up to 128K, 1 above)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    ap.add_argument("--loss-chunk-tokens", type=int, default=2048)
    ap.add_argument("--transformer-engine", choices=["auto", "on", "off"], default="auto",
                    help="ours: model.transformer_engine")
    ap.add_argument("--hf-attention", choices=["auto", "flex", "sdpa"], default="auto")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="dense bf16 peak of the GPU for MFU (H100 SXM: 989)")
    ap.add_argument("--attempt-predicted-oom", action="store_true",
                    help="also run configurations the memory plan says do not fit (to check the plan)")
    ap.add_argument("--job-timeout", type=float, default=600.0, help="seconds per configuration")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds for all configurations; later ones are skipped once it is spent (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_train_out", help="directory for the JSON, CSV and log")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker_main(*args.worker)
    if args.probe:
        return probe_main()

    env = probe()
    if args.device == "auto":
        args.device = "cuda" if env["cuda"] else "cpu"
    if args.device == "cuda" and not env["cuda"]:
        ap.error("--device cuda, but torch sees no GPU; for a CPU smoke run use --device cpu --tiny")
    if args.device == "cpu" and not args.tiny and args.model == "llama3-8b":
        ap.error("the llama3-8b geometry on CPU would take hours; use --tiny (or --model llama3-debug)")
    if args.tiny:
        args.model = "llama3-debug"
        args.seq_lengths = args.seq_lengths or [128]
        args.steps = 2 if args.steps is None else args.steps
        args.loss_chunk_tokens = 32
    args.seq_lengths = args.seq_lengths or [65536, 131072, 524288]
    if args.global_batch < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        ap.error("--global-batch and --steps must be >= 1, --warmup >= 0")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args, env)
    print(f"{env.get('gpu') or 'cpu'}: {len(jobs)} configurations -> {out_dir}/{{{','.join(RESULT_NAMES)}}}",
          flush=True)
    results, t_start = [], time.time()
    (out_dir / "bench_train.log").write_text("")
    # Append mode: the workers write through the inherited descriptor, the driver's headers land after.
    with open(out_dir / "bench_train.log", "a", encoding="utf-8") as log:
        for job in jobs:
            left = args.time_budget - (time.time() - t_start) if args.time_budget else None
            if job.predicted_oom and not args.attempt_predicted_oom:
                result = {"status": "skipped", "message": f"memory plan {job.planned_gib:.0f} GiB > GPU "
                          f"{env.get('gpu_memory_gib', 0):.0f} GiB even at {job.layers} layer(s); "
                          "--attempt-predicted-oom runs it"}
                result["job"] = dataclasses.asdict(job)
            elif left is not None and left <= 0:
                result = {"status": "skipped", "message": "time budget spent", "job": dataclasses.asdict(job)}
            else:
                timeout = args.job_timeout if left is None else min(args.job_timeout, left + 30)
                print(f"--- {job.name} ({job.mix}, {job.warmup} warmup + {job.steps} timed steps)", flush=True)
                result = run_job(job, out_dir, log, timeout)
                print(f"    {result['status']} in {result['wall_s']:.0f} s"
                      + (f": {result['tokens_per_s']:,.0f} tokens/s" if result["status"] == "ok" else
                         f": {result.get('message', '')}"), flush=True)
            results.append(result)
            write_results(out_dir, results, env, args)  # after every row: a later crash loses nothing
    print_table(results, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
