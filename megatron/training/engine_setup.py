"""Model, optimizer, LR schedule and the DeepSpeed engine, built in one visible order.

1. the model (plain ``GPTModel`` or the pipeline module) from the config sections;
2. parameter groups (no weight decay on biases and norms; expert shards in groups of their
   own) and the optimizer;
3. the LR schedule (stepped by the loop after every applied update);
4. ``deepspeed.initialize`` with the DeepSpeed dict built from the config and, for the plain
   model, the parallel state as ``mpu``;
5. the step guard wrapped around the optimizer's update;
6. the :class:`~megatron.training.engine.Engine` for the layout, the loop's only handle.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.logging.model_stats import ModelStats
from megatron.model import build_model
from megatron.model.pipeline import PipelineLMLoss, pipeline_key_to_model_key
from megatron.neox_arguments import ConfigError, NeoXConfig, build_deepspeed_config
from megatron.parallel.experts import split_expert_param_groups
from megatron.parallel.state import ParallelState
from megatron.runtime import Runtime
from megatron.training.compile import apply_compile_and_fp8
from megatron.training.control import StepGuard
from megatron.training.engine import Engine, GuardedPipelineLoss, ModelEngine, PipelineEngine
from megatron.training.grad_norm import NormClipper
from megatron.training.lora import apply_lora
from megatron.training.lr_schedule import build_lr_scheduler
from megatron.training.noise_scale import GradientNoiseScale
from megatron.training.optimizers import (
    build_optimizer,
    check_zero_compat,
    param_groups,
    uses_deepspeed_optimizer,
)
from megatron.training.post_training import (
    Objective,
    attach_reward_head,
    frozen,
    needs_reference,
)
from megatron.training.te_layers import apply_transformer_engine


def _single_replica_reduction_is_identity(engine: Any, cfg: NeoXConfig, zero_stage: int,
                                          is_pipeline: bool, state: ParallelState) -> bool:
    """Whether DeepSpeed's gradient all-reduce after every backward leaves the gradients
    exactly as they are: one data-parallel replica, no ZeRO (whose reduction also moves the
    gradients into its partitions), no pre-division, and either no precision change in the
    communication or (bf16) fp32 gradients that hold one bf16 micro batch's gradient, which a
    round trip through bf16 keeps exactly. Then the all-reduce only costs time: it flattens
    every gradient into a new buffer, scales it by 1, "reduces" it over one rank and copies it
    back."""
    if is_pipeline or zero_stage != 0 or state.dp_size != 1:
        return False
    if getattr(engine, "dp_world_size", 1) != 1 or engine.gradient_predivide_factor() != 1.0:
        return False
    comm = engine.communication_data_type
    precision = cfg.precision.precision
    if precision == "fp32":
        return comm == torch.float32
    if precision == "bfloat16":
        return comm == torch.float32 or (cfg.training.gradient_accumulation_steps or 1) == 1
    return False


def build_engine(rt: Runtime) -> Engine:
    """The engine for ``rt.cfg``'s layout (``train_iters`` already decided: see
    :func:`megatron.training.data_setup.sample_budget`)."""
    import deepspeed

    cfg = rt.cfg
    assert cfg.tokenizer.padded_vocab_size is not None
    if uses_deepspeed_optimizer(cfg.optim):
        raise ConfigError(f"optimizer: {cfg.optim.optimizer_type} is not available here "
                          "(DeepSpeed builds it on GPUs with NCCL only)")
    guard = StepGuard(cfg.training.max_consecutive_skipped_iters)
    is_pipeline = cfg.parallelism.is_pipe_parallel
    loss_hook = None
    if is_pipeline:
        loss_hook = GuardedPipelineLoss(
            PipelineLMLoss(rt.state, fp32=not cfg.model.fp16_lm_cross_entropy), guard)
    def new_model(loss_fn: Any = None) -> torch.nn.Module:
        return build_model(cfg.model, cfg.act_ckpt, cfg.parallelism,
                           padded_vocab_size=cfg.tokenizer.padded_vocab_size, state=rt.state,
                           tracker=rt.tracker, loss_fn=loss_fn, init_seed=cfg.training.seed)

    model = new_model(loss_hook)
    objective = None
    if cfg.posttrain.train_impl != "normal" or cfg.posttrain.z_loss > 0:
        if cfg.posttrain.train_impl == "rm":
            attach_reward_head(model, cfg)
        objective = Objective(cfg, rt.state)
    pt = cfg.posttrain
    if pt.lora_rank > 0:
        layer_name = None
        if is_pipeline:  # adapters drawn by the plain model's layer names: any layout alike
            def layer_name(name: str) -> str:
                return pipeline_key_to_model_key(name, cfg.model)
        adapted = apply_lora(model, rank=pt.lora_rank, alpha=pt.lora_alpha,
                             dropout=pt.lora_dropout, targets=pt.lora_target_modules,
                             state=rt.state, seed=cfg.training.seed, layer_name=layer_name)
        if rt.state.rank == 0:
            print(f"LoRA: rank {pt.lora_rank} adapters on {len(adapted)} layers; "
                  "the base weights are frozen", flush=True)
    model.to(rt.device)
    apply_transformer_engine(model, cfg)  # te_* keys (no-op when unset)
    if objective is not None and needs_reference(cfg):
        # the starting model's weights are copied in by Engine.start, after any load
        objective.reference = frozen(new_model().to(rt.device))
    apply_compile_and_fp8(model, cfg)  # torch_compile / fp8_training (no-op when unset)
    zero_stage = int((cfg.ds.zero_optimization or {}).get("stage", 0))
    try:
        groups = split_expert_param_groups(param_groups(model, cfg.optim.weight_decay))
        built = build_optimizer(cfg.optim, groups)
        check_zero_compat(cfg.optim, zero_stage, built.optimizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    optimizer = built.optimizer
    lg = cfg.logging
    stats = None
    if (lg.log_param_norm or lg.log_grad_norm or lg.log_grad_pct_zeros
                            or lg.log_optimizer_states):
        stats = ModelStats.build(model, optimizer, rt.state, param_norm=lg.log_param_norm,
                                 grad_norm=lg.log_grad_norm,
                                 grad_pct_zeros=lg.log_grad_pct_zeros,
                                 optimizer_states=lg.log_optimizer_states)
    noise = None
    if lg.log_gradient_noise_scale:
        noise = GradientNoiseScale(rt.state, cfg.training.train_batch_size or 1,
                                   lg.gradient_noise_scale_n_batches,
                                   cpu_offload=lg.gradient_noise_scale_cpu_offload)
    scheduler = build_lr_scheduler(optimizer, cfg.lr, cfg.optim, cfg.training.train_iters)
    ds_config = build_deepspeed_config(cfg)
    clipper = None
    if zero_stage == 0 and cfg.precision.precision == "fp32" \
            and cfg.training.gradient_clipping > 0:
        clipper = NormClipper(model, rt.state, cfg.training.gradient_clipping)
        ds_config["gradient_clipping"] = 0.0
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        mpu=None if is_pipeline else rt.state, dist_init_required=False,
    )
    if _single_replica_reduction_is_identity(engine, cfg, zero_stage, is_pipeline, rt.state):
        engine.enable_backward_allreduce = False
    guard.install(optimizer, engine.optimizer, pre_update=clipper)
    if stats is not None:
        stats.engine_optimizer = engine.optimizer
    common = {"ds": engine, "optimizer": optimizer, "scheduler": scheduler, "guard": guard,
              "state": rt.state, "cfg": cfg, "clipper": clipper}
    if is_pipeline:
        pipe = PipelineEngine(**common, loss_hook=loss_hook, stats=stats, noise=noise)
        if stats is not None or noise is not None:
            pipe.observe_updates()
        return pipe
    return ModelEngine(**common, objective=objective, stats=stats, noise=noise)
