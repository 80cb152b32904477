"""The run record: everything decided once per process, after the platform is up.

Device, precision, TE on/off, the attention kernel, the CP communication, the model spec (with the
checkpoint's and the recipe's overrides applied) and this rank's place in the parallel layout are
resolved here, once, and handed to the builders and the training loop. Nothing below this asks
the machine again (``platform`` is the only module that asks torch about CUDA).

``decide(cfg, device=..., te_version=..., fused_wgrad=...)`` is the pure part (no process groups):
tests call it with any machine facts they want to simulate.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import checkpoint_layout as layout
from .. import platform
from ..config import Config, ConfigError
from ..models.registry import SHAPE_FIELDS, ModelSpec, architecture_differences, get_model_spec
from ..parallel.cp_layout import default_cp_comm_type

@dataclass(frozen=True)
class Decisions:
    """What the machine and the config together decide, before any process group exists."""

    device_type: str
    """``cuda`` or ``cpu``."""
    bf16: bool
    use_te: bool
    attention_backend: str
    """Kernel of the portable attention (``flex``, ``sdpa``, ...); ``te`` when TE's attention runs."""
    cp_comm_type: str
    gradient_accumulation_fusion: bool
    """TE linears accumulate weight gradients straight into the fp32 main grads; needs apex's
    ``fused_weight_gradient_mlp_cuda`` for megatron's own output layer."""
    te_version: Optional[tuple[int, int]]

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def decide(cfg: Config, *, device: str, te_version: Optional[tuple[int, int]],
           fused_wgrad: bool) -> Decisions:
    """The device-level decisions for ``cfg`` on a machine described by the arguments."""
    on_cuda = device == "cuda"
    mode = cfg.model.transformer_engine
    if mode == "on" and (te_version is None or not on_cuda):
        missing = "Transformer Engine is not importable" if te_version is None else \
            f"the run is on {device} (TE kernels need CUDA)"
        raise ConfigError(f"model.transformer_engine=on but {missing}; install TE (see docker/) and run on "
                          "a GPU, or set model.transformer_engine=auto (TE when available) or off")
    use_te = on_cuda and te_version is not None and mode != "off"
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
    backend = cfg.model.attention_backend
    if use_te:
        backend = "te"
    elif backend == "auto":
        backend = "flex" if on_cuda else "sdpa"  # flex_attention has no CPU backward
    comm = cfg.parallel.cp_comm_type
    if comm == "auto":
        comm = default_cp_comm_type(use_te)
    return Decisions(device_type=device, bf16=bf16, use_te=use_te, attention_backend=backend,
                     cp_comm_type=comm, gradient_accumulation_fusion=use_te and fused_wgrad,
                     te_version=te_version)


@dataclass(frozen=True)
class SpecOrigin:
    """Where each field of the run's model spec came from; printed at start-up."""

    base: str
    """``registry <name>`` or ``checkpoint <folder>``: where every field not set by the recipe comes from."""
    fields: dict
    """ModelSpec field -> ``base``, or the recipe key that set it (``model.rotary_base``,
    ``model.overrides``, ``train.seq_length``)."""
    note: str = ""
    """What the recipe asked for and was not used (a ``model.name`` the checkpoint contradicts)."""

    def lines(self, spec: ModelSpec) -> list[str]:
        def value(f):
            v = getattr(spec, f)
            return f"{v:g}" if isinstance(v, float) else str(v)

        base = [f"{f} {value(f)}" for f, o in self.fields.items() if o == self.base]
        recipe = [f"{f} {value(f)} ({o})" for f, o in self.fields.items() if o != self.base]
        line = f"model {spec.name}: from {self.base}: {', '.join(base)}"
        if recipe:
            line += f"; from the recipe: {', '.join(recipe)}"
        return [line] + ([self.note] if self.note else [])


@dataclass(frozen=True)
class Run:
    """One process's resolved run: decisions, model spec, parallel coordinates."""

    decisions: Decisions
    device: torch.device
    spec: ModelSpec
    """The model as built: registry or checkpoint spec, recipe overrides, trained context length."""
    spec_origin: SpecOrigin
    """Where each field of ``spec`` came from."""
    world_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_size: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def logging_rank(self) -> bool:
        """The one rank that prints progress: last pipeline stage, first of TP, CP and DP."""
        return self.is_last_stage and self.tp_rank == 0 and self.cp_rank == 0 and self.dp_rank == 0

    @property
    def is_rank0(self) -> bool:
        return torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True

    # Shorthands the builders and the loop read.
    @property
    def use_te(self) -> bool:
        return self.decisions.use_te

    @property
    def bf16(self) -> bool:
        return self.decisions.bf16

    @property
    def params_dtype(self) -> torch.dtype:
        return self.decisions.params_dtype

    @property
    def on_cuda(self) -> bool:
        """The run is a GPU run (its decisions are CUDA's; a dry run's tensors are fake)."""
        return self.decisions.device_type == "cuda"


def spec_checkpoint(cfg: Config) -> Optional[str]:
    """The checkpoint whose stored model spec the run builds: the ``save_dir`` it resumes, else
    ``init_from``; None: the registry's ``model.name``."""
    c = cfg.checkpoint
    if c.save_dir and layout.latest_iteration(c.save_dir) is not None:
        return c.save_dir
    return c.init_from


def resolve_model_spec(cfg: Config) -> tuple[ModelSpec, SpecOrigin]:
    """The spec stored with the checkpoint the run starts from (any Llama architecture), else the
    registry's ``model.name``; the recipe's RoPE base and overrides on top (each ProLong stage sets
    its theta), and the trained context length recorded."""
    m = cfg.model
    overrides = m.recipe_overrides()
    source = spec_checkpoint(cfg)
    note = ""
    if source is None:
        base, label = get_model_spec(m.registry_name), f"registry {m.registry_name}"
        if m.name is None:
            label += " (model.name unset)"
    else:
        base, label = layout.model_spec_from_meta(layout.read_checkpoint_meta(source), where=source), \
            f"checkpoint {source}"
        note = _check_against_checkpoint(cfg, base, source, overrides)
    spec = base.replace(**overrides)
    origin = {f.name: label for f in dataclasses.fields(ModelSpec) if f.name != "name"}
    origin.update({f: "model.rotary_base" if f == "rotary_base" and m.rotary_base is not None else "model.overrides"
                   for f in overrides})
    # The saved spec records the longest context trained on (a 512K model's exported config then
    # says 524288, not Llama-3's 8192). RoPE itself does not depend on it.
    if cfg.train.seq_length > spec.max_position_embeddings:
        spec = spec.replace(max_position_embeddings=cfg.train.seq_length)
        origin["max_position_embeddings"] = "train.seq_length"
    cfg.check_model_layout(spec, f" (from checkpoint {source})" if source else "")
    return spec, SpecOrigin(base=label, fields=origin, note=note)


def _check_against_checkpoint(cfg: Config, stored: ModelSpec, source: str, overrides: dict) -> str:
    """Refuse overrides that would change the stored weights' shapes; return the note for a
    ``model.name`` that names another architecture (empty when there is none)."""
    reshaped = [f"{f}={v!r} (the checkpoint has {getattr(stored, f)!r})" for f, v in overrides.items()
                if f in SHAPE_FIELDS and v != getattr(stored, f)]
    if reshaped:
        raise ConfigError(f"model.overrides sets {', '.join(reshaped)}, but checkpoint {source}'s weights load "
                          "only at their own shapes; remove these overrides (the checkpoint's architecture "
                          "is built without them)")
    name = cfg.model.name
    differs = architecture_differences(stored, get_model_spec(name)) if name is not None else []
    if not differs:
        return ""
    return (f"model.name={name} is not used: checkpoint {source} holds another architecture "
            f"(checkpoint vs {name}: {', '.join(differs)}), which is built")


def validate_decisions(cfg: Config, decisions: Decisions, spec: ModelSpec) -> None:
    """Checks that need the decisions (TE or not, its version): before any model is built."""
    from ..parallel.context_parallel import validate_cp_config

    p = cfg.parallel
    try:
        validate_cp_config(cp_size=p.context, seq_length=cfg.train.seq_length, use_te=decisions.use_te,
                           cp_comm_type=decisions.cp_comm_type, hierarchical_cp_sizes=p.hierarchical_cp_sizes,
                           num_layers=spec.num_layers, tp_size=p.tensor, sequence_parallel=p.sequence_parallel,
                           num_heads=spec.num_attention_heads, num_kv_heads=spec.num_query_groups,
                           te_version=decisions.te_version)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    if not decisions.use_te:
        from ..attention.backends import unavailable_reason

        reason = unavailable_reason(decisions.attention_backend, cuda=decisions.device_type == "cuda")
        if reason:
            raise ConfigError(reason)
    if cfg.data.pad_token_id >= spec.vocab_size:
        raise ConfigError(f"data.pad_token_id={cfg.data.pad_token_id} is outside the vocabulary of "
                          f"{spec.name} ({spec.vocab_size} tokens); choose an id below {spec.vocab_size}")


def decide_for_machine(cfg: Config) -> Decisions:
    """``decide`` with this machine's facts, asked once from ``platform``."""
    try:
        device_type = platform.resolve_device(cfg.train.device)
    except platform.PlatformError as e:
        raise ConfigError(str(e)) from None
    on_cuda = device_type == "cuda"
    return decide(cfg, device=device_type, te_version=platform.te_version(),
                  fused_wgrad=on_cuda and platform.fused_wgrad_available())


def resolve_run(cfg: Config) -> Run:
    """Check the world, decide, start the process groups, and return this rank's record."""
    from megatron.core import parallel_state as ps

    from .. import parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.check_world(world_size)  # before any process group exists
    decisions = decide_for_machine(cfg)
    device_type = decisions.device_type
    spec, origin = resolve_model_spec(cfg)
    validate_decisions(cfg, decisions, spec)
    p = cfg.parallel
    parallel.initialize(p.tensor, p.pipeline, p.context, device=device_type, seed=cfg.train.seed,
                        timeout_minutes=cfg.train.collective_timeout_minutes,
                        hierarchical_cp_sizes=p.hierarchical_cp_sizes if decisions.use_te else None)
    return Run(
        decisions=decisions, device=platform.current_device(), spec=spec, spec_origin=origin,
        world_size=world_size,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        is_first_stage=ps.is_pipeline_first_stage(), is_last_stage=ps.is_pipeline_last_stage(),
    )
