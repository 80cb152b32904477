"""Build the model chunks (DDP-wrapped), the distributed optimizer and the LR schedule."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import Config, ConfigError
from ..models import build_gpt_model, build_transformer_config, te_available
from ..models.registry import ModelSpec


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())


def use_te(cfg: Config) -> bool:
    mode = cfg.model.transformer_engine
    if mode == "on" and not te_available():
        raise RuntimeError("model.transformer_engine=on but Transformer Engine or a GPU is missing; "
                           "install TE (see docker/) or set model.transformer_engine=auto")
    return mode == "on" or (mode == "auto" and te_available())


def cp_comm_type(cfg: Config) -> str:
    from ..parallel.cp_layout import default_cp_comm_type

    c = cfg.parallel.cp_comm_type
    return default_cp_comm_type(use_te(cfg)) if c == "auto" else c


def transformer_config(cfg: Config, spec: ModelSpec) -> TransformerConfig:
    p, t = cfg.parallel, cfg.train
    bf16 = use_bf16(cfg)
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    te_cp = {}
    if use_te(cfg) and p.context > 1:
        te_cp = dict(cp_comm_type=cp_comm_type(cfg))
        if p.hierarchical_cp_sizes:
            te_cp["hierarchical_context_parallel_sizes"] = list(p.hierarchical_cp_sizes)
    # With TE (GPU), megatron's usual fusions: weight-gradient accumulation straight into the fp32
    # main-grad buffers, fused RoPE, fused cross-entropy (the chunked loss head has its own).
    fusions = {}
    if use_te(cfg):
        fusions = dict(gradient_accumulation_fusion=True, apply_rope_fusion=True,
                       cross_entropy_loss_fusion=cfg.model.loss_chunk_tokens == 0,
                       # THD packing pads each document, so micro-batches differ in token count:
                       # pipeline stages must exchange shapes before activations.
                       variable_seq_lengths=p.pipeline > 1)
    return build_transformer_config(
        spec,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        **recompute,
        **te_cp,
        **fusions,
    )


def check_context_parallel(cfg: Config, spec: ModelSpec) -> None:
    """CP settings that depend on whether TE runs (known only here), checked before building."""
    from ..parallel.context_parallel import validate_cp_config

    p = cfg.parallel
    try:
        validate_cp_config(cp_size=p.context, seq_length=cfg.train.seq_length, use_te=use_te(cfg),
                           cp_comm_type=cp_comm_type(cfg), hierarchical_cp_sizes=p.hierarchical_cp_sizes,
                           num_layers=spec.num_layers, tp_size=p.tensor, sequence_parallel=p.sequence_parallel)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None


def build_model(cfg: Config, spec: ModelSpec) -> list[DistributedDataParallel]:
    """This rank's model chunk, DDP-wrapped, in a list (megatron's schedule API)."""
    config = transformer_config(cfg, spec)
    model = build_gpt_model(
        spec, config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        use_te=use_te(cfg),
        attention_backend=cfg.model.attention_backend,
    )
    if cfg.model.loss_chunk_tokens and hasattr(model, "loss_chunk_tokens"):
        model.loss_chunk_tokens = cfg.model.loss_chunk_tokens
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # Hooks the pipeline schedules call: grad all-reduce/reduce-scatter and token-count scaling.
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        config.no_sync_func = ddp.no_sync
    return [ddp]


def build_optimizer(cfg: Config, model: list):
    o = cfg.optim
    bf16 = use_bf16(cfg)
    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        model,
    )


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Cosine decay to ``min_lr_ratio`` x peak after a linear warmup; stepped in samples."""
    o, t = cfg.optim, cfg.train
    gbs = t.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=int(o.warmup_ratio * t.steps) * gbs,
        lr_decay_steps=t.steps * gbs,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.steps * gbs,
        wd_incr_style="constant",
    )
