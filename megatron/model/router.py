"""The mixture-of-experts router: which experts each token goes to, with what weight, and the
router's auxiliary losses.

``logits = x W^T`` (``W [experts, hidden]``, replicated over tensor-parallel ranks). Two routers:

* ``topk``: the ``k`` largest logits; weights = softmax over those ``k`` logits (the same as
  a softmax over all experts renormalized over the chosen ones, Mixtral's rule);
* ``sinkhorn``: in training the experts are chosen on Sinkhorn-balanced scores (alternate row
  and column normalizations of ``exp(logits)`` until the column factors move less than 1e-4),
  and weighted by ``sigmoid(logits)`` for ``k = 1`` or ``softmax(logits)`` otherwise, taken at
  the chosen experts; outside training the top-``k`` of those weights are taken directly.

Auxiliary losses (over this rank's tokens of one forward pass):

* load balancing (Switch/GShard): ``coeff * E * sum_e f_e * P_e`` with ``f_e`` the fraction
  of the ``T * k`` assignments that chose expert ``e`` and ``P_e`` the mean over tokens of the
  softmax probability of ``e``;
* z-loss (ST-MoE): ``coeff * mean_t(logsumexp(logits_t)^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs
from megatron.model.init_methods import InitFn
from megatron.parallel.layers import master_weight, set_tensor_parallel_attributes


@dataclass(frozen=True)
class Routing:
    """The router's decision for ``T`` tokens."""

    experts: torch.Tensor  # [T, k] int64 expert ids
    weights: torch.Tensor  # [T, k] combination weights
    aux_loss: torch.Tensor  # scalar, coefficient applied (0 when off)
    z_loss: torch.Tensor  # scalar, coefficient applied (0 when off)
    tokens_per_expert: torch.Tensor  # [E] assignments per expert (before any dropping)


def sinkhorn(cost: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Sinkhorn-Knopp balancing of ``exp(cost)`` (``[T, E]``): row and column factors are
    alternated until the column factors change by less than ``tol`` on average."""
    k = torch.exp(cost)
    rows = torch.ones(k.shape[0], dtype=k.dtype, device=k.device)
    cols = torch.ones(k.shape[1], dtype=k.dtype, device=k.device)
    eps = 1e-8
    for _ in range(max_iters):
        rows = 1.0 / (k.shape[0] * ((k * cols).sum(dim=1) + eps))
        new_cols = 1.0 / (k.shape[1] * ((k * rows[:, None]).sum(dim=0) + eps))
        change = (new_cols - cols).abs().mean()
        cols = new_cols
        if float(change) <= tol:
            break
    return k * cols * rows[:, None]


class Router(nn.Module):
    def __init__(self, model: ModelArgs, *, init_method: InitFn) -> None:
        super().__init__()
        assert model.hidden_size is not None
        self.num_experts = model.moe_num_experts
        self.top_k = model.moe_top_k
        self.kind = model.moe_router_type
        self.jitter_eps = model.moe_jitter_eps
        self.lbl_in_fp32 = model.moe_lbl_in_fp32
        self.aux_loss_coeff = model.moe_aux_loss_coeff
        self.z_loss_coeff = model.moe_z_loss_coeff
        weight = master_weight((self.num_experts, model.hidden_size), init_method)
        self.weight = nn.Parameter(weight)
        set_tensor_parallel_attributes(self.weight, False)  # replicated

    def forward(self, x: torch.Tensor) -> Routing:
        """``x [T, h]`` (every token of this rank, full hidden size) -> :class:`Routing`."""
        if self.training and self.jitter_eps:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x = x * noise
        logits = F.linear(x, self.weight.to(x.dtype))
        if self.kind == "sinkhorn":
            experts, weights = self._sinkhorn(logits)
        else:
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(top.float(), dim=-1).to(logits.dtype)
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts)
        aux, z = self._losses(logits, counts)
        return Routing(experts, weights, aux, z, counts)

    def _sinkhorn(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.top_k == 1:
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        if not self.training:
            weights, experts = torch.topk(scores, self.top_k, dim=-1)
            return experts, weights
        with torch.no_grad():
            balanced = sinkhorn(logits.detach().float())
            experts = torch.topk(balanced, self.top_k, dim=-1).indices
        return experts, torch.gather(scores, 1, experts)

    def _losses(self, logits: torch.Tensor,
                counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = logits.new_zeros((), dtype=torch.float32)
        source = logits.float() if self.lbl_in_fp32 else logits
        tokens = logits.shape[0]
        aux = zero
        if self.aux_loss_coeff and tokens:
            probs = torch.softmax(source, dim=-1)
            fraction = counts.to(probs.dtype) / (tokens * self.top_k)
            aux = self.aux_loss_coeff * self.num_experts * (fraction * probs.mean(dim=0)).sum()
        z = zero
        if self.z_loss_coeff and tokens:
            z = self.z_loss_coeff * torch.logsumexp(source, dim=-1).square().mean()
        return aux.float(), z.float()
