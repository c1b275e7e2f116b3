"""The gradient noise scale (McCandlish et al., 2018, "An Empirical Model of Large-Batch
Training"), estimated while training as GPT-NeoX does (``log_gradient_noise_scale``).

The simple noise scale is ``B_simple = tr(Sigma) / |G|^2``: the trace of the per-example
gradient covariance over the squared true gradient. From the squared norms of gradients
measured at two batch sizes, ``B_small`` and ``B_big``, unbiased estimates are::

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

``G_small`` is one step's gradient (``B_small`` = the global batch); ``G_big`` is the mean of
the gradients of ``gradient_noise_scale_n_batches`` consecutive steps (``B_big`` = n x the
global batch). Both estimates are smoothed by an exponential moving average (beta 0.99) and
the logged value is their ratio. Norms are over the full gradient: tensor-parallel shards add
up and a replicated parameter counts once (the buffer holds this rank's part only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron.parallel.layers import param_is_not_tp_duplicate
from megatron.parallel.state import ParallelState


def noise_and_scale(g_small_sq: float, g_big_sq: float, b_small: float,
                    b_big: float) -> tuple[float, float]:
    """The estimates ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes."""
    true_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return true_sq, trace


class GradientNoiseScale:
    """Accumulates step gradients and updates the running noise-scale estimate."""

    def __init__(self, state: ParallelState, batch_size: int, n_batches: int, *,
                 beta: float = 0.99, cpu_offload: bool = False):
        if n_batches < 2:
            raise ValueError("gradient_noise_scale_n_batches must be at least 2, got "
                             f"{n_batches}")
        self.state = state
        self.b_small = float(batch_size)
        self.b_big = float(batch_size * n_batches)
        self.n_batches = n_batches
        self.beta = beta
        self.cpu_offload = cpu_offload
        self.buffer: list[torch.Tensor] | None = None
        self.collected = 0
        self.estimates = 0
        self.ema_true_sq = 0.0
        self.ema_trace = 0.0
        self.noise_scale: float | None = None

    def _sq_norm(self, grads: Sequence[torch.Tensor], counted: Sequence[bool]) -> float:
        local = torch.zeros((), dtype=torch.float64)
        for g, c in zip(grads, counted):
            if c:
                local += g.double().pow(2).sum().cpu()
        group = self.state.model_group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(local, group=group)
        return float(local)

    def update(self, params: Sequence[torch.nn.Parameter],
               grads: Sequence[torch.Tensor | None]) -> None:
        """One step's (finite, data-parallel averaged) gradients, aligned with ``params``."""
        present = [(p, g) for p, g in zip(params, grads) if g is not None]
        # tensor-parallel copies and the pipeline's second copy of a tied weight count once
        counted = [param_is_not_tp_duplicate(p, self.state)
                   and not getattr(p, "ds_pipe_replicated", False) for p, _ in present]
        step = [g.detach().float().flatten() for _, g in present]
        if self.cpu_offload:
            step = [g.cpu() for g in step]
        if self.buffer is None:
            self.buffer = [g.clone() for g in step]
        else:
            for acc, g in zip(self.buffer, step):
                acc.add_(g)
        self.collected += 1
        if self.collected < self.n_batches:
            return
        big = [acc / self.n_batches for acc in self.buffer]
        self.buffer, self.collected = None, 0
        g_small_sq = self._sq_norm(step, counted)
        g_big_sq = self._sq_norm(big, counted)
        if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)):
            return
        true_sq, trace = noise_and_scale(g_small_sq, g_big_sq, self.b_small, self.b_big)
        # the moving averages' bias correction divides both by the same factor: the ratio
        # needs none
        self.ema_true_sq = self.beta * self.ema_true_sq + (1 - self.beta) * true_sq
        self.ema_trace = self.beta * self.ema_trace + (1 - self.beta) * trace
        self.estimates += 1
        if self.ema_true_sq != 0.0:
            self.noise_scale = self.ema_trace / self.ema_true_sq
