"""Build the model chunks (DDP-wrapped), the distributed optimizer and the LR schedule."""

from __future__ import annotations

import itertools

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import Config
from ..models import build_gpt_model, build_transformer_config
from .run import Run


def transformer_config(cfg: Config, run: Run) -> TransformerConfig:
    return build_transformer_config(run.spec, **transformer_config_overrides(cfg, run))


def transformer_config_overrides(cfg: Config, run: Run) -> dict:
    """What the run adds to the Llama-3 TransformerConfig: layout, precision, recompute, TE
    settings (a plain dict: megatron validates TE fusions against an installed TE)."""
    p, t, d = cfg.parallel, cfg.train, run.decisions
    recompute = {}
    if t.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif t.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    te_cp = {}
    if d.use_te and p.context > 1:
        te_cp = dict(cp_comm_type=d.cp_comm_type)
        if p.hierarchical_cp_sizes:
            te_cp["hierarchical_context_parallel_sizes"] = list(p.hierarchical_cp_sizes)
    # With TE (GPU), megatron's usual fusions: fused RoPE, fused cross-entropy (the chunked loss
    # head has its own), and weight-gradient accumulation straight into the fp32 main-grad buffers
    # where apex provides the kernel megatron's output layer needs for it.
    fusions = {}
    if d.use_te:
        fusions = dict(gradient_accumulation_fusion=d.gradient_accumulation_fusion, apply_rope_fusion=True,
                       cross_entropy_loss_fusion=cfg.model.loss_chunk_tokens == 0,
                       # THD packing pads each document, so micro-batches differ in token count:
                       # pipeline stages must exchange shapes before activations.
                       variable_seq_lengths=p.pipeline > 1)
    return dict(
        on_gpu=run.on_cuda,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        sequence_parallel=p.sequence_parallel,
        bf16=d.bf16,
        params_dtype=d.params_dtype,
        pipeline_dtype=d.params_dtype,
        **recompute,
        **te_cp,
        **fusions,
    )


def build_model_chunk(cfg: Config, run: Run):
    """This rank's GPTModel on the run's device, unwrapped (evaluation needs no gradient buffers)."""
    model = build_gpt_model(
        run.spec, transformer_config(cfg, run),
        pre_process=run.is_first_stage,
        post_process=run.is_last_stage,
        use_te=run.use_te,
        attention_backend=run.decisions.attention_backend,
        loss_chunk_tokens=cfg.model.loss_chunk_tokens,
        device_type=run.decisions.device_type,
    )
    # Only when needed: a dry run's fake parameters are built on its device and cannot be swapped.
    if any(t.device != run.device for t in itertools.chain(model.parameters(), model.buffers())):
        model = model.to(run.device)
    return model


def build_model(cfg: Config, run: Run) -> list[DistributedDataParallel]:
    """This rank's model chunk, DDP-wrapped, in a list (megatron's schedule API)."""
    model = build_model_chunk(cfg, run)
    config = model.config
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


def build_optimizer(cfg: Config, run: Run, model: list):
    """megatron's distributed optimizer (AdamW), with the project's fixes to it applied first."""
    from . import mcore_fixes

    mcore_fixes.apply()
    o = cfg.optim
    bf16 = run.bf16
    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=bf16, params_dtype=run.params_dtype,
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
