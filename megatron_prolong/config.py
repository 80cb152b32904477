"""The typed configuration tree: YAML recipe + dotted command-line overrides, checked up front.

    cfg = load_config("examples/prolong_64k.yaml", ["train.lr=2e-5", "parallel.context=4"])

Every field carries a docstring (the string literal below it). ``__post_init__`` of each section
rejects what can be rejected without knowing the world size; ``Config.check_world`` adds the
checks that need it (TP x PP x CP x DP, global batch vs micro batch x DP).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .attention import ATTENTION_BACKENDS
from .checkpoint_layout import LATEST_FILE
from .data.config import DataConfig
from .models.registry import ModelSpec, get_model_spec, list_models
from .parallel.cp_layout import CP_COMM_TYPES, check_seq_length

DEFAULT_MODEL = "llama3-debug"
"""The architecture of a run with neither ``model.name`` nor a checkpoint."""
OPTIMIZER_FORMATS = ("parallel_reshardable", "fully_reshardable", "dp_reshardable")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says how to fix it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    name: Optional[str] = None
    """The architecture of a run that starts from no checkpoint: one of
    ``megatron_prolong.models.list_models()`` (unset: ``llama3-debug``, a CPU-sized debug model).
    A run that starts from a checkpoint (``checkpoint.init_from``, or a ``checkpoint.save_dir`` it
    resumes) builds the architecture stored with that checkpoint, any Llama-architecture model
    converted with ``hf-to-megatron``; a name that differs from it is then reported at start-up
    and not used."""
    rotary_base: Optional[float] = None
    """RoPE theta, on top of the registry's or the checkpoint's (ProLong: 8e6 for 64K, 1.28e8 for
    512K). None keeps the model's."""
    overrides: dict = field(default_factory=dict)
    """Further ModelSpec field overrides, e.g. ``{num_layers: 2}`` for a smoke run. On top of a
    checkpoint only fields that leave the weights' shapes alone may change."""
    transformer_engine: str = "auto"
    """``auto`` (TE when installed and on GPU), ``on`` or ``off`` (portable attention)."""
    attention_backend: str = "auto"
    """Kernel of the portable (non-TE) attention: ``auto`` (flex on CUDA, sdpa on CPU), or one of
    ``megatron_prolong.attention.ATTENTION_BACKENDS``. Ignored on the TE path."""
    loss_chunk_tokens: int = 0
    """Compute the output layer + cross-entropy in chunks of this many tokens so the full
    [tokens x vocab] logits never exist (needed at 512K). 0: one piece."""

    def __post_init__(self):
        _require(self.name is None or self.name in list_models(),
                 f"model.name={self.name!r} is unknown; choose one of {list_models()}, or leave it unset "
                 "and set checkpoint.init_from to a converted checkpoint (its architecture is used)")
        _require(self.transformer_engine in ("auto", "on", "off"),
                 f"model.transformer_engine must be auto, on or off, got {self.transformer_engine!r}")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"model.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _require(self.loss_chunk_tokens >= 0, "model.loss_chunk_tokens must be >= 0 (0 disables chunking)")
        self.spec()  # unknown override keys fail here, not at step 0

    @property
    def registry_name(self) -> str:
        return self.name or DEFAULT_MODEL

    def recipe_overrides(self) -> dict:
        """The ModelSpec fields the recipe sets: ``overrides``, and ``rotary_base`` when given."""
        overrides = dict(self.overrides)
        if self.rotary_base is not None:
            overrides["rotary_base"] = float(self.rotary_base)
        return overrides

    def spec(self) -> ModelSpec:
        """The registry's model with the recipe's overrides: what a run without a checkpoint builds."""
        try:
            return get_model_spec(self.registry_name, **self.recipe_overrides())
        except ValueError as e:
            raise ConfigError(f"model.overrides: {e}") from None


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (must divide the attention heads and KV heads)."""
    pipeline: int = 1
    """Pipeline-parallel size (must divide the number of layers)."""
    context: int = 1
    """Context-parallel size. The portable attention splits every sample by its documents, balanced
    for the attention work (``parallel/cp_balance.py``); TE zigzags each document (THD). The
    sequence length must be a multiple of 2 x CP."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms/dropout activations (needs tensor > 1)."""
    cp_comm_type: str = "auto"
    """Context-parallel communication. ``auto``: all_gather on the portable attention (K/V
    all-gathered, dK/dV reduce-scattered; the only one it implements), p2p with TE (the one TE
    supports for packed documents in every release). TE also takes a2a (TE >= 2.10, heads per TP
    rank divisible by CP); all_gather and a2a+p2p cannot run THD-packed documents on the TE
    releases megatron-core 0.16.1 supports and are refused at start-up."""
    hierarchical_cp_sizes: Optional[list] = None
    """TE a2a+p2p only: CP sizes per level whose product is ``context``, e.g. [8, 2] for a2a
    inside a node and p2p across 2 nodes."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with backward (GPU)."""

    def __post_init__(self):
        for name in ("tensor", "pipeline", "context"):
            _require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        _require(not self.sequence_parallel or self.tensor > 1,
                 "parallel.sequence_parallel needs parallel.tensor > 1; set it false or raise tensor")
        _require(self.cp_comm_type in ("auto",) + CP_COMM_TYPES,
                 f"parallel.cp_comm_type must be auto, {', '.join(CP_COMM_TYPES[:-1])} or {CP_COMM_TYPES[-1]}, "
                 f"got {self.cp_comm_type!r}")

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    """Peak learning rate (ProLong: 1e-5 pre-training, 2e-5 SFT)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of ``lr``."""
    warmup_ratio: float = 0.1
    """Linear warmup length as a fraction of ``train.steps``."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        _require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio must be in [0, 1)")
        _require(self.clip_grad >= 0, "optim.clip_grad must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 10
    """Optimizer steps of the run (the schedule length)."""
    seq_length: int = 64
    """Tokens per sample (ProLong: 65536, then 524288)."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks."""
    global_batch_tokens: Optional[int] = None
    """Alternative to ``global_batch_size``: tokens per step (ProLong: 4M at 64K, 8M at 512K);
    must be a multiple of ``seq_length``."""
    exit_at_step: Optional[int] = None
    """Stop after this step, with a checkpoint, although the schedule spans ``steps`` (jobs with
    a time limit; the next launch resumes)."""
    seed: int = 1234
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    recompute: str = "none"
    """Activation recompute: ``none``, ``selective`` (core attention) or ``full`` (every layer)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cuda`` or ``cpu`` (gloo; CI and debugging)."""
    max_bad_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (weights, optimizer state and
    LR schedule unchanged; its global batch counts as consumed). After this many consecutive
    skipped steps the run stops with an error and saves nothing (see docs/fault_tolerance.md)."""
    loss_spike_factor: float = 2.0
    """Report a loss above this multiple of the median of the last ``loss_spike_window`` applied
    steps (log line and TensorBoard ``train/loss_spike``); a report only, the step is applied.
    0 disables."""
    loss_spike_window: int = 50
    """Steps in the running median of ``loss_spike_factor`` (reports start once 10 are in)."""
    collective_timeout_minutes: float = 30.0
    """Timeout of every collective (NCCL and gloo groups, and the rendezvous store): a rank whose
    peers died or hang fails with an error after this long instead of waiting forever. Must
    exceed the longest legitimate wait (a step, a synchronous checkpoint save or load); fractions
    are allowed (0.5 = 30 s)."""

    def __post_init__(self):
        _require(self.steps >= 1, "train.steps must be >= 1")
        _require(self.seq_length >= 2, "train.seq_length must be >= 2")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        _require(self.exit_at_step is None or 1 <= self.exit_at_step <= self.steps,
                 f"train.exit_at_step must be between 1 and train.steps={self.steps}")
        _require((self.global_batch_size is None) != (self.global_batch_tokens is None),
                 "set exactly one of train.global_batch_size (samples) or train.global_batch_tokens")
        if self.global_batch_tokens is not None:
            _require(self.global_batch_tokens % self.seq_length == 0,
                     f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                     f"train.seq_length={self.seq_length}")
            self.global_batch_size = self.global_batch_tokens // self.seq_length
            self.global_batch_tokens = None
        _require(self.global_batch_size >= 1, "train.global_batch_size must be >= 1")
        _require(self.precision in ("auto", "bf16", "fp32"), "train.precision must be auto, bf16 or fp32")
        _require(self.recompute in ("none", "selective", "full"),
                 "train.recompute must be none, selective or full")
        _require(self.device in ("auto", "cuda", "cpu"), "train.device must be auto, cuda or cpu")
        _require(self.max_bad_steps >= 1,
                 f"train.max_bad_steps must be >= 1 (consecutive skipped steps before the run stops), "
                 f"got {self.max_bad_steps}")
        _require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
                 f"train.loss_spike_factor must be 0 (off) or > 1 (a multiple of the median loss), "
                 f"got {self.loss_spike_factor}")
        _require(self.loss_spike_window >= 10, "train.loss_spike_window must be >= 10 steps")
        _require(self.collective_timeout_minutes > 0,
                 f"train.collective_timeout_minutes must be > 0, got {self.collective_timeout_minutes}; "
                 "the default 30 suits most runs")


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    """Where checkpoints go; a run finding one here resumes from the latest complete one."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    save_at_end: bool = True
    init_from: Optional[str] = None
    """A model-only checkpoint to start from (e.g. converted from Hugging Face): its stored
    architecture is built (``model.name`` is not needed), with the recipe's ``model.rotary_base``
    on top where the recipe sets one. Ignored when ``save_dir`` already holds a checkpoint to
    resume."""
    keep_last: int = 0
    """Delete older checkpoints, keeping this many (0 keeps all)."""
    exit_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (Slurm pre-emption), save after the current step and exit."""
    optimizer_format: str = "parallel_reshardable"
    """Distributed-optimizer state on disk. ``parallel_reshardable``: every rank writes and reads
    its share of the state in parallel (per-parameter tensors, each written by one data-parallel
    rank), and a resume may use any TP/PP/CP/DP layout (``training/optimizer_state.py``).
    ``fully_reshardable`` (megatron's): any layout too, but each model shard's whole optimizer
    state is gathered onto every rank to save and read whole to load (about 48 GB per rank for 8B
    at TP 2). ``dp_reshardable`` (megatron's): parallel, but a resume may change DP only. Model
    weights are always reshardable (``init_from``)."""
    async_save: bool = True
    """Write periodic checkpoints in the background: the step loop stalls only to plan the save
    and capture the tensors (on GPUs a copy to host memory), then a forked writer process writes
    them; the checkpoint is finalised (renamed, made ``latest``) once every rank's writer
    finished. The save at the end and forced saves (pre-emption signal, ``exit_at_step``) are
    synchronous and wait for a pending one first. false: every save blocks until written."""

    def __post_init__(self):
        _require(self.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last must be >= 0")
        _require(self.optimizer_format in OPTIMIZER_FORMATS,
                 f"checkpoint.optimizer_format must be one of {OPTIMIZER_FORMATS}, got {self.optimizer_format!r}")
        _require(self.save_dir is not None or self.save_interval == 0,
                 "checkpoint.save_interval needs checkpoint.save_dir")
        if self.init_from is not None:
            _require(Path(self.init_from).is_dir(),
                     f"checkpoint.init_from={self.init_from!r} is not a directory")

    def may_resume(self) -> bool:
        """``save_dir`` holds a latest-checkpoint marker (whether it is sound is checked at resume)."""
        return self.save_dir is not None and (Path(self.save_dir) / LATEST_FILE).is_file()


@dataclass
class LoggingConfig:
    interval: int = 1
    """Print a progress line every N steps."""
    tensorboard_dir: Optional[str] = None

    def __post_init__(self):
        _require(self.interval >= 1, "logging.interval must be >= 1")


@dataclass
class EvalConfig:
    """Validation during training, on ``data.valid_blend`` (or ``data.valid_data_prefix``).

    The loss is token-averaged like the training loss, through the same forward and CP split,
    reported overall and per validation dataset (printed and under ``eval/`` in TensorBoard).
    Evaluation leaves the run untouched: a run with it on trains exactly like one with it off
    (RNG states, data position and train mode are restored). For long-context measures of a
    saved checkpoint (perplexity by position, needle retrieval) see ``tools/evaluate.py``."""

    interval: int = 0
    """Evaluate every N training steps (0: no periodic evaluation)."""
    samples: Optional[int] = None
    """Validation samples of ``train.seq_length`` tokens per evaluation, the same ones each time
    (comparable across steps); must be a multiple of ``train.micro_batch_size`` x data-parallel
    size. None: ``train.global_batch_size``."""
    at_end: bool = True
    """Also evaluate after the last step, when validation data is configured."""

    def __post_init__(self):
        _require(self.interval >= 0, "eval.interval must be >= 0 (0 disables periodic evaluation)")
        _require(self.samples is None or self.samples >= 1,
                 "eval.samples must be >= 1 (or null for one global batch)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(global_batch_size=1))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        p, t = self.parallel, self.train
        _require(not self.eval.interval or self.data.valid_entries(),
                 f"eval.interval={self.eval.interval} needs validation data: set data.valid_blend "
                 "(e.g. {'path/to/valid_prefix': 1.0}; held-out documents), or data.valid_data_prefix with "
                 "data.mixture; or set eval.interval=0")
        if self.checkpoint.init_from is None and not self.checkpoint.may_resume():
            # Else the model is the checkpoint's, checked when the run reads it (training/run.py).
            self.check_model_layout(self.model.spec(), "")
        try:
            check_seq_length(t.seq_length, p.context, p.tensor, p.sequence_parallel)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check_model_layout(self, spec: ModelSpec, origin: str) -> None:
        """TP must divide the heads, PP the layers of the model built (``origin``: where it comes from)."""
        p = self.parallel
        _require(spec.num_attention_heads % p.tensor == 0 and spec.num_query_groups % p.tensor == 0,
                 f"parallel.tensor={p.tensor} must divide the {spec.num_attention_heads} attention heads "
                 f"and {spec.num_query_groups} KV heads of {spec.name}{origin}")
        _require(spec.num_layers % p.pipeline == 0,
                 f"parallel.pipeline={p.pipeline} must divide the {spec.num_layers} layers of {spec.name}{origin}")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of ranks."""
        p, t = self.parallel, self.train
        _require(world_size % p.model_parallel == 0,
                 f"world size {world_size} is not divisible by TP x PP x CP = {p.tensor} x {p.pipeline} x "
                 f"{p.context} = {p.model_parallel}; launch a multiple of {p.model_parallel} ranks")
        dp = world_size // p.model_parallel
        _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
                 f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                 f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
        samples = self.eval_samples()
        _require(samples % (t.micro_batch_size * dp) == 0,
                 f"eval.samples={samples} must be a multiple of train.micro_batch_size x data-parallel size = "
                 f"{t.micro_batch_size} x {dp} (every rank evaluates whole micro-batches); set eval.samples="
                 f"{max(1, samples // (t.micro_batch_size * dp)) * t.micro_batch_size * dp}")

    def eval_samples(self) -> int:
        """Validation samples per evaluation (``eval.samples``, default one global batch)."""
        return self.eval.samples if self.eval.samples is not None else self.train.global_batch_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading

def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML recipe (optional) and apply ``section.field=value`` overrides (YAML values)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        node = raw
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return _build(Config, raw, "")


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, fields, n=1)
        hint = f"; did you mean {where}{close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
        raise ConfigError(f"unknown config key {where}{k!r}{hint}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Light type checking of YAML scalars (ints where floats are expected, etc.)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = origin in (typing.Union, types.UnionType)
    if value is None:
        if is_union and type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{where} must not be null")
    if is_union:
        if len(args) != 1:
            return value  # e.g. dict | list: the section's own __post_init__ checks it
        hint = args[0]
        origin = typing.get_origin(hint)
    if hint is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads a bare on/off (transformer_engine: on) as a bool
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    if (origin or hint) in (dict, list) and not isinstance(value, origin or hint):
        raise ConfigError(f"{where} must be a {(origin or hint).__name__}, got {value!r}")
    return value
