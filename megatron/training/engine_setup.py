"""Model, optimizer, LR schedule and the DeepSpeed engine, built in one visible order.

1. the model (plain ``GPTModel`` or the pipeline module) from the config sections;
2. parameter groups (no weight decay on biases and norms) and the optimizer;
3. the LR schedule (stepped by the loop after every applied update);
4. ``deepspeed.initialize`` with the DeepSpeed dict built from the config and, for the plain
   model, the parallel state as ``mpu``;
5. the step guard wrapped around the optimizer's update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron.logging.timers import Timers
from megatron.model import build_model, lm_loss
from megatron.model.pipeline import PipelineLMLoss
from megatron.neox_arguments import ConfigError, NeoXConfig, build_deepspeed_config
from megatron.parallel.layers import (
    param_is_not_tp_duplicate,
    register_sequence_parallel_grad_hooks,
)
from megatron.parallel.state import ParallelState
from megatron.training.compile import apply_compile_and_fp8
from megatron.training.control import StepGuard, grad_norms
from megatron.training.data_setup import LMBatch
from megatron.training.lr_schedule import AnnealingLR, build_lr_scheduler
from megatron.training.optimizers import (
    build_optimizer,
    check_zero_compat,
    param_groups,
    uses_deepspeed_optimizer,
)
from megatron.training.runtime import Runtime


class GuardedPipelineLoss:
    """The pipeline engine's loss function: the LM loss, reported to the step guard (and
    made non-finite on request, to exercise the skip path)."""

    def __init__(self, base: PipelineLMLoss, guard: StepGuard):
        self.base = base
        self.guard = guard
        self.inject = False

    def __call__(self, logits: torch.Tensor, labels: Any) -> torch.Tensor:
        loss = self.base(logits, labels)
        if self.inject:
            loss = loss * float("nan")
        self.guard.note_loss(loss)
        return loss


def _counted_grads(params: Iterable[torch.nn.Parameter], state: ParallelState
                   ) -> tuple[list[torch.Tensor], list[bool]]:
    """This rank's gradients, and for each whether it counts in the global norm: tensor-parallel
    copies and the pipeline's second copy of a tied weight count once."""
    grads, counted = [], []
    for p in params:
        if p.grad is None:
            continue
        grads.append(p.grad)
        counted.append(param_is_not_tp_duplicate(p, state)
                       and not getattr(p, "ds_pipe_replicated", False))
    return grads, counted


def _global_norm(norms: torch.Tensor, counted: list[bool], state: ParallelState) -> float:
    """sqrt of the sum of squared per-tensor norms over all tensor and pipeline ranks."""
    if all(counted):
        local = norms.pow(2).sum()
    else:
        mask = torch.tensor(counted, device=norms.device)
        local = norms[mask].pow(2).sum()
    group = state.model_group
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(local, group=group)
    return float(local.sqrt())


def check_grads(params: Iterable[torch.nn.Parameter], state: ParallelState, *,
                global_norm: bool) -> tuple[bool, float | None]:
    """One fused pass over this rank's gradients: ``(all finite here, global L2 norm)``.

    The global norm (over all tensor and pipeline ranks, see :func:`global_grad_norm`; a
    collective over the model-parallel group) is computed only when ``global_norm``; None
    also when the gradients are not on the parameters (ZeRO keeps them in its partitions)."""
    grads, counted = _counted_grads(params, state)
    if not grads:
        return True, None
    norms = grad_norms(grads)
    finite = bool(torch.isfinite(norms).all())
    return finite, _global_norm(norms, counted, state) if global_norm else None


def global_grad_norm(params: Iterable[torch.nn.Parameter], state: ParallelState) -> float | None:
    """L2 norm of the gradients held on the parameters, over all tensor and pipeline ranks:
    tensor-parallel copies and the pipeline's second copy of a tied weight count once.
    None when the gradients are not on the parameters (ZeRO keeps them in its partitions)."""
    return check_grads(params, state, global_norm=True)[1]


class NormClipper:
    """Gradient clipping by the global norm for fp32 without ZeRO, replacing DeepSpeed's.

    DeepSpeed's fp32 clipping (``clip_grad_norm_``) takes one norm per parameter, two
    all-reduces and multiplies every gradient by the coefficient even when it is 1; and in the
    pipeline engine it counts the parameters replicated across tensor ranks only on
    "model-parallel rank 0" of its pipeline grid, i.e. only on the first stage, which
    understates the norm. DeepSpeed's clipping is switched off (``gradient_clipping: 0`` in its
    config) and this clips just before the update instead, by the norm over all ranks.

    On the plain model the trainer calls :meth:`measure` after the last backward of a step:
    one fused pass gives this rank's finiteness verdict for the step guard, the global norm
    for the logs and the norm this clips by, so the gradients are read once (and written only
    when the coefficient is below 1). The pipeline engine steps inside ``train_batch``, so
    there the norm is measured when the update runs."""

    def __init__(self, module: torch.nn.Module, state: ParallelState, max_norm: float):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.state = state
        self.max_norm = max_norm
        self.last_norm: float | None = None
        self._pending: float | None = None

    def measure(self) -> bool:
        """Norm of this step's gradients (kept for the update); returns this rank's
        finiteness verdict."""
        finite, norm = check_grads(self.params, self.state, global_norm=True)
        self._pending = self.last_norm = norm
        return finite

    def __call__(self) -> float | None:
        norm, self._pending = self._pending, None
        if norm is None:
            norm = global_grad_norm(self.params, self.state)
            self.last_norm = norm
        if norm is None or not math.isfinite(norm):
            return norm
        coef = self.max_norm / (norm + 1e-6)
        if coef < 1.0:  # a coefficient of 1 would leave every gradient as it is
            grads = [p.grad for p in self.params if p.grad is not None]
            # as a 0-dim tensor: a Python scalar is wrapped into a tensor once per gradient
            torch._foreach_mul_(grads, torch.tensor(coef, dtype=grads[0].dtype,
                                                    device=grads[0].device))
        return norm


PipelineClipper = NormClipper  # the earlier name


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


@dataclass
class Engine:
    ds: Any  # deepspeed DeepSpeedEngine or PipelineEngine
    optimizer: torch.optim.Optimizer
    scheduler: AnnealingLR
    guard: StepGuard
    state: ParallelState
    cfg: NeoXConfig
    is_pipeline: bool
    loss_hook: GuardedPipelineLoss | None = None
    timers: Timers = field(default_factory=Timers)
    clipper: NormClipper | None = None
    _grad_norm: float | None = None

    @property
    def inject_here(self) -> bool:
        """The rank whose loss the fault injection corrupts (one that computes the loss)."""
        if self.is_pipeline:
            return self.state.is_pipeline_last_stage() and self.state.dp_rank == 0 \
                and self.state.tp_rank == 0
        return self.state.rank == 0

    def forward_loss(self, batch: LMBatch) -> torch.Tensor:
        logits = self.ds(batch.tokens, position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask)
        return lm_loss(logits, batch.labels, batch.loss_mask, self.state,
                       fp32=not self.cfg.model.fp16_lm_cross_entropy)

    def pipeline_inputs(self, batches: Iterator[LMBatch]) -> Iterator[tuple]:
        for b in batches:
            mask = b.attention_mask if b.attention_mask is not None else \
                torch.zeros(0, dtype=torch.bool, device=b.tokens.device)
            yield (b.tokens, b.position_ids, mask), (b.labels, b.loss_mask)

    def before_step(self, measure_norm: bool) -> bool:
        """At the accumulation boundary, after the last backward and before the update: one
        pass over this rank's gradients. Returns whether they are all finite (for the step
        guard); keeps the global norm for clipping (fp32 without ZeRO: every step) and for
        the log (``measure_norm``)."""
        if self.clipper is not None:
            self._grad_norm = None
            return self.clipper.measure()
        finite, norm = check_grads(self.ds.module.parameters(), self.state,
                                   global_norm=measure_norm)
        self._grad_norm = norm
        return finite

    def grad_norm(self) -> float | None:
        if self.clipper is not None and self.clipper.last_norm is not None:
            return self.clipper.last_norm
        if self._grad_norm is not None:
            return self._grad_norm
        norm = self.ds.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return None if norm is None or (isinstance(norm, float) and math.isnan(norm)) else norm

    def loss_scale(self) -> float | None:
        if self.cfg.precision.precision != "fp16":
            return None
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None

    def tied_weight_difference(self) -> float | None:
        """Largest |difference| between the copies of each pipeline-tied weight (the word
        embedding on the first and last stage); None without tied weights on this rank."""
        import deepspeed.comm as ds_dist

        module = self.ds.module
        worst: float | None = None
        for key, comm in getattr(module, "tied_comms", {}).items():
            for attr in comm["weight_attr"]:
                weight = module._recursive_getattr(module.tied_modules[key], attr).detach()
                owner = weight.clone()
                ds_dist.broadcast(owner, src=min(comm["ranks"]), group=comm["group"])
                diff = (weight.float() - owner.float()).abs().max().reshape(1)
                ds_dist.all_reduce(diff, op=ds_dist.ReduceOp.MAX, group=comm["group"])
                worst = max(worst or 0.0, float(diff))
        return worst

    def dp_mean(self, value: float) -> float:
        group = self.state.dp_group
        if group is None or torch.distributed.get_world_size(group) == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, group=group)
        return float(tensor) / torch.distributed.get_world_size(group)


def build_engine(cfg: NeoXConfig, rt: Runtime, train_iters: int) -> Engine:
    import deepspeed

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
    model = build_model(cfg.model, cfg.act_ckpt, cfg.parallelism,
                        padded_vocab_size=cfg.tokenizer.padded_vocab_size, state=rt.state,
                        tracker=rt.tracker, loss_fn=loss_hook, init_seed=cfg.training.seed)
    model.to(rt.device)
    apply_compile_and_fp8(model, cfg)  # torch_compile / fp8_training (no-op when unset)
    if not is_pipeline and rt.state.sequence_parallel:
        register_sequence_parallel_grad_hooks(model, rt.state)
    zero_stage = int((cfg.ds.zero_optimization or {}).get("stage", 0))
    try:
        built = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay))
        check_zero_compat(cfg.optim, zero_stage, built.optimizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    optimizer = built.optimizer
    scheduler = build_lr_scheduler(optimizer, cfg.lr, cfg.optim, train_iters)
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
    return Engine(ds=engine, optimizer=optimizer, scheduler=scheduler, guard=guard,
                  state=rt.state, cfg=cfg, is_pipeline=is_pipeline, loss_hook=loss_hook,
                  timers=Timers(), clipper=clipper)
