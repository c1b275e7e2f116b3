"""Gradient norms, finiteness and clipping over the model's parallel layout.

One fused pass over this rank's gradients gives the step guard's finiteness verdict, the global
norm for the logs and the norm to clip by; tensor-parallel copies and the pipeline's second copy of
a tied weight count once in the global norm, and expert shards on the expert-parallel rank that
holds them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from megatron.parallel.experts import is_expert_parameter
from megatron.parallel.layers import param_is_not_tp_duplicate
from megatron.parallel.state import ParallelState
from megatron.training.control import grad_norms


def _counted_grads(params: Iterable[torch.nn.Parameter], state: ParallelState
                   ) -> tuple[list[torch.Tensor], list[bool], list[bool]]:
    """This rank's gradients, for each whether it counts in the global norm (tensor-parallel
    copies and the pipeline's second copy of a tied weight count once), and whether it is an
    expert shard (the other expert-parallel ranks hold the other experts)."""
    grads, counted, experts = [], [], []
    for p in params:
        if p.grad is None:
            continue
        grads.append(p.grad)
        counted.append(param_is_not_tp_duplicate(p, state)
                       and not getattr(p, "ds_pipe_replicated", False))
        experts.append(is_expert_parameter(p))
    return grads, counted, experts


def _global_norm(norms: torch.Tensor, counted: list[bool], state: ParallelState,
                 experts: list[bool]) -> float:
    """sqrt of the sum of squared per-tensor norms over all tensor and pipeline ranks, the
    expert shards' also over the expert-parallel ranks."""
    squares = norms.pow(2)
    if not all(counted):
        squares = squares * torch.tensor(counted, device=norms.device, dtype=squares.dtype)
    if state.ep_size > 1 and any(experts):
        is_expert = torch.tensor(experts, device=norms.device)
        shards = squares[is_expert].sum()
        torch.distributed.all_reduce(shards, group=state.ep_group)
        local = squares[~is_expert].sum() + shards
    else:
        local = squares.sum()
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
    grads, counted, experts = _counted_grads(params, state)
    if not grads:
        return True, None
    norms = grad_norms(grads)
    finite = bool(torch.isfinite(norms).all())
    return finite, _global_norm(norms, counted, state, experts) if global_norm else None


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
