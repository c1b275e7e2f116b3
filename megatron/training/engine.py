"""One engine interface for every parallel layout.

The training loop talks to an :class:`Engine` only: :meth:`~Engine.train_step` runs one
optimizer step over ``gradient_accumulation_steps`` micro batches and returns its loss,
:meth:`~Engine.eval_losses` the losses of one evaluation iteration, :meth:`~Engine.mean_loss`
averages a loss over the data-parallel replicas for the logs, and :meth:`~Engine.after_save`
checks what a layout needs checked after a checkpoint. Two implementations:

- :class:`ModelEngine`: the plain model under DeepSpeed's engine; the loop's micro-batch loop,
  the step guard's verdict and the fused gradient-norm pass live here;
- :class:`PipelineEngine`: DeepSpeed's pipeline engine, which runs the micro batches of a step
  inside ``train_batch``; the step guard sees the loss through :class:`GuardedPipelineLoss`.

A new layout (or a new loss, e.g. for post-training) implements the same few methods.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron.logging.model_stats import ModelStats
from megatron.logging.timers import Timers
from megatron.model import lm_loss
from megatron.model.moe import collect_moe_metrics, moe_blocks
from megatron.model.pipeline import PipelineLMLoss
from megatron.neox_arguments import NeoXConfig
from megatron.parallel.state import ParallelState
from megatron.training.control import StepGuard
from megatron.training.data_setup import LMBatch
from megatron.training.grad_norm import NormClipper, check_grads
from megatron.training.lora import merged_state_dict
from megatron.training.lr_schedule import AnnealingLR
from megatron.training.noise_scale import GradientNoiseScale
from megatron.training.post_training import Objective


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


def _timed(timers: Timers | None, name: str) -> Any:
    """A timer context for the wall-clock breakdown, or nothing when it is off."""
    return timers(name).timing() if timers is not None else contextlib.nullcontext()


@dataclass
class Engine:
    """What the loop needs of a built model, optimizer, schedule and DeepSpeed engine."""

    ds: Any  # DeepSpeed's DeepSpeedEngine or PipelineEngine
    optimizer: torch.optim.Optimizer
    scheduler: AnnealingLR
    guard: StepGuard
    state: ParallelState
    cfg: NeoXConfig
    timers: Timers = field(default_factory=Timers)
    clipper: NormClipper | None = None
    stats: ModelStats | None = None  # log_param_norm, log_grad_norm, ...
    noise: GradientNoiseScale | None = None  # log_gradient_noise_scale
    _moe_blocks: list | None = field(default=None, init=False, repr=False)
    _stats: dict[str, float] = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------ the interface
    @property
    def inject_here(self) -> bool:
        """Whether this rank computes the loss that fault injection corrupts."""
        return self.state.rank == 0

    def train_step(self, batches: Iterator[LMBatch], *, inject: bool,
                   measure_norm: bool) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro batches from
        ``batches``; returns the step's loss. ``inject`` makes this rank's loss non-finite
        (tests of the skip path); ``measure_norm`` asks for the global gradient norm (a log
        step). The step guard decides whether the update is applied."""
        raise NotImplementedError

    def eval_losses(self, batches: Iterator[LMBatch]) -> list[float]:
        """The losses of one evaluation iteration (no gradients)."""
        raise NotImplementedError

    def mean_loss(self, value: float) -> float:
        """A loss averaged over the data-parallel replicas (for the logs)."""
        return value

    def after_save(self) -> str | None:
        """A line for the log after a checkpoint was written, if the layout has one."""
        return None

    def client_state(self) -> dict[str, Any]:
        """What the layout adds to a checkpoint's client state (the DPO/KTO reference)."""
        return {}

    def start(self, client_state: dict[str, Any] | None) -> None:
        """After any checkpoint is loaded, before the first step: ``client_state`` is the
        resumed checkpoint's (None when starting: from scratch or a finetune load)."""

    def sequence_length_changed(self) -> None:
        """The next step's batches have another length (the sequence-length curriculum)."""

    def take_metrics(self, kind: str = "train") -> dict[str, float]:
        """The method's extra values (rewards, margins, accuracy, KL) averaged over the micro
        batches since the last call and over the data-parallel replicas; ``kind`` train or
        eval."""
        return {}

    # ------------------------------------------------------------------ shared
    def observe_grads(self, log_step: bool) -> None:
        """After the step guard's verdict, before the update (every rank: collective): the
        gradient statistics of a log step and the noise scale's update."""
        scale = self.loss_scale() or 1.0  # fp16 gradients are loss-scaled until the update
        if log_step and self.stats is not None:
            self._stats = self.stats.grad_values(scale)
        if self.noise is not None and not self.guard.skip:
            from deepspeed.utils import safe_get_full_grad

            params = [p for p in self.ds.module.parameters() if p.requires_grad]
            grads = [safe_get_full_grad(p) for p in params]
            if scale != 1.0:
                grads = [None if g is None else g.float() / scale for g in grads]
            self.noise.update(params, grads)

    def take_stats(self) -> dict[str, float]:
        """The per-parameter statistics of the last log step and the gradient noise scale
        (empty unless their keys are set)."""
        out, self._stats = self._stats, {}
        if self.noise is not None and self.noise.noise_scale is not None:
            out["noise_scale"] = self.noise.noise_scale
        return out

    def prepare_moe_step(self) -> None:
        """Tell the MoE blocks what backward multiplies the loss by (1 / accumulation steps,
        times the fp16 loss scale), so their auxiliary losses get the same factor."""
        if self._moe_blocks is None:  # found once: the model's modules do not change
            self._moe_blocks = moe_blocks(self.ds.module)
        blocks = self._moe_blocks
        if not blocks:
            return
        gas = self.cfg.training.gradient_accumulation_steps or 1
        scale = (self.loss_scale() or 1.0) / gas
        for block in blocks:
            block.aux_loss_scale = scale

    def moe_metrics(self) -> dict[str, float]:
        """Routing statistics since the last call, over every MoE layer and rank: mean
        auxiliary and z-loss per layer and forward pass, tokens per expert (min, max,
        imbalance = max / mean) and the fraction of dropped assignments. Collective (every
        rank calls it); empty for a dense model."""
        return collect_moe_metrics(self.ds.module, self.state, self.cfg.model)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step (None where it is not known)."""
        if self.clipper is not None and self.clipper.last_norm is not None:
            return self.clipper.last_norm
        norm = self.ds.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = float(norm)
        return None if norm is None or (isinstance(norm, float) and math.isnan(norm)) else norm

    def loss_scale(self) -> float | None:
        if self.cfg.precision.precision != "fp16":
            return None
        scale = getattr(self.ds.optimizer, "cur_scale", None)
        return float(scale) if scale is not None else None


@dataclass
class ModelEngine(Engine):
    """The plain model (every layer on every rank of a pipeline-less layout)."""

    _grad_norm: float | None = None
    objective: Objective | None = None  # post-training methods and z_loss
    _sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def forward_loss(self, batch: LMBatch) -> torch.Tensor:
        if self.objective is not None:
            loss, metrics = self.objective.loss(self.ds, batch)
            sums = self._sums.setdefault("train" if torch.is_grad_enabled() else "eval", {})
            for k, v in metrics.items():
                entry = sums.setdefault(k, [0.0, 0.0])
                entry[0] += float(v)
                entry[1] += 1.0
            return loss
        logits = self.ds(batch.tokens, position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask)
        return lm_loss(logits, batch.labels, batch.loss_mask, self.state,
                       fp32=not self.cfg.model.fp16_lm_cross_entropy)

    def take_metrics(self, kind: str = "train") -> dict[str, float]:
        sums = self._sums.pop(kind, {})
        names = self.objective.metric_names() if self.objective is not None else ()
        if not names:
            return {}
        # [sum, count] per name; every rank reduces the same list
        values = torch.tensor([sums.get(k, [0.0, 0.0]) for k in names], dtype=torch.float64)
        group = self.state.dp_group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(values, group=group)
        return {k: float(s / n) for k, (s, n) in zip(names, values.tolist()) if n > 0}

    def client_state(self) -> dict[str, Any]:
        ref = self.objective.reference if self.objective is not None else None
        return {} if ref is None else {"reference_model": ref.state_dict()}

    def start(self, client_state: dict[str, Any] | None) -> None:
        ref = self.objective.reference if self.objective is not None else None
        if ref is None:
            return
        saved = (client_state or {}).get("reference_model")
        # the reference is the starting model: the one just built or loaded for finetuning,
        # or, when resuming, the one the run started from (saved with every checkpoint)
        if saved is None:
            saved = self.ds.module.state_dict()
            pt = self.cfg.posttrain
            if pt.lora_rank > 0:  # the starting model with its adapters folded in
                saved = merged_state_dict(saved, rank=pt.lora_rank, alpha=pt.lora_alpha)
        ref.load_state_dict(saved, strict=True)

    def train_step(self, batches: Iterator[LMBatch], *, inject: bool,
                   measure_norm: bool) -> float:
        gas = self.cfg.training.gradient_accumulation_steps or 1
        timers = self.timers if self.cfg.ds.wall_clock_breakdown else None
        self.prepare_moe_step()
        losses = []
        for i in range(gas):
            with _timed(timers, "data"):
                batch = next(batches)
            with _timed(timers, "forward"):
                loss = self.forward_loss(batch)
            if inject and i == 0:
                loss = loss * float("nan")
            self.guard.note_loss(loss)
            with _timed(timers, "backward"):
                self.ds.backward(loss)
            losses.append(loss.detach())
            with _timed(timers, "optimizer"):
                if i == gas - 1:
                    # one pass over the gradients: the guard's verdict, the norm to clip by
                    # and, at log steps, the logged norm
                    finite = self.before_step(measure_norm=measure_norm)
                    self.guard.decide(grads_finite=finite)
                    self.observe_grads(measure_norm)
                self.ds.step()
        if measure_norm and self.stats is not None:
            self._stats.update(self.stats.param_values())
        total = 0.0
        for loss in losses:  # read after the update: no host sync per micro batch
            total += float(loss)
        return total / gas

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

    def eval_losses(self, batches: Iterator[LMBatch]) -> list[float]:
        gas = self.cfg.training.gradient_accumulation_steps or 1
        return [float(self.forward_loss(next(batches))) for _ in range(gas)]

    def mean_loss(self, value: float) -> float:
        group = self.state.dp_group
        if group is None or torch.distributed.get_world_size(group) == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, group=group)
        return float(tensor) / torch.distributed.get_world_size(group)

    def grad_norm(self) -> float | None:
        if (self.clipper is None or self.clipper.last_norm is None) \
                and self._grad_norm is not None:
            return self._grad_norm
        return super().grad_norm()


@dataclass
class PipelineEngine(Engine):
    """DeepSpeed's pipeline engine: the micro batches of a step run inside ``train_batch``
    (its losses come back averaged over the data-parallel replicas)."""

    loss_hook: GuardedPipelineLoss | None = None
    _log_step: bool = False

    def observe_updates(self) -> None:
        """The pipeline engine steps inside ``train_batch``: wrap DeepSpeed's optimizer step
        (called once per step, after the gradients are reduced, before the update) so the
        gradient statistics and the noise scale see the step's gradients."""
        inner = self.ds.optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if not self.guard.decided:
                self.guard.decide(())
            self.observe_grads(self._log_step)
            return inner(*args, **kwargs)

        self.ds.optimizer.step = step

    @property
    def inject_here(self) -> bool:
        return self.state.is_pipeline_last_stage() and self.state.dp_rank == 0 \
            and self.state.tp_rank == 0

    @staticmethod
    def _stage_inputs(batches: Iterator[LMBatch]) -> Iterator[tuple]:
        for b in batches:
            mask = b.attention_mask if b.attention_mask is not None else \
                torch.zeros(0, dtype=torch.bool, device=b.tokens.device)
            yield (b.tokens, b.position_ids, mask), (b.labels, b.loss_mask)

    def train_step(self, batches: Iterator[LMBatch], *, inject: bool,
                   measure_norm: bool) -> float:
        if self.loss_hook is not None:
            self.loss_hook.inject = inject
        self.prepare_moe_step()
        self._log_step = measure_norm
        loss = self.ds.train_batch(data_iter=self._stage_inputs(batches))
        if measure_norm and self.stats is not None:
            self._stats.update(self.stats.param_values())
        return float(loss.detach().float())

    def eval_losses(self, batches: Iterator[LMBatch]) -> list[float]:
        return [float(self.ds.eval_batch(data_iter=self._stage_inputs(batches)))]

    def sequence_length_changed(self) -> None:
        self.ds.reset_activation_shape()  # the stages' receive buffers have the old shape

    def after_save(self) -> str | None:
        diff = self.tied_weight_difference()
        return None if diff is None else f"tied weights: max |difference| between stages {diff:g}"

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
