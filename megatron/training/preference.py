"""Losses of the post-training methods, on per-sequence log-probabilities.

Every function here takes tensors of one value per sequence (``[b]``) and returns the scalar
loss and a dictionary of detached values for the logs. The log-probabilities come from
:func:`sequence_logps`, which reads them off the vocabulary-parallel logits without gathering
the vocabulary.

=============  ==============================================================================
``dpo``        ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; rewards
               ``beta * (pi - ref)``; ``reference_free`` takes ``ref = 0``.
``kto``        desirable: ``1 - sigmoid(beta * (pi - ref - kl))``, undesirable:
               ``1 - sigmoid(beta * (kl - (pi - ref)))``, weighted and averaged over the
               examples; ``kl`` is the (clamped, detached) mean log-ratio of the KL sequences.
``orpo``       ``nll(chosen) - lambda * mean(log sigmoid(log odds(c) - log odds(r)))`` on
               per-token mean log-probabilities; rewards ``lambda * logp``.
``rm``         ``-log sigmoid(r_c - r_r)`` on scalar rewards.
``z_loss``     ``mean(logsumexp(logits) ** 2)`` over the loss-masked tokens.
=============  ==============================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.mappings import reduce_from_tp_region
from megatron.parallel.state import ParallelState

Metrics = dict[str, torch.Tensor]


def token_logps(logits: torch.Tensor, labels: torch.Tensor, state: ParallelState,
                fp32: bool = True) -> torch.Tensor:
    """Log-probability of every label ``[b, s]`` under vocabulary-parallel ``logits``."""
    if fp32:
        logits = logits.float()
    return -vocab_parallel_cross_entropy(logits, labels, state)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   state: ParallelState, *, fp32: bool = True,
                   average: bool = False) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-probability of the masked labels, per
    sequence ``[b]``."""
    per_token = token_logps(logits, labels, state, fp32=fp32)
    mask = loss_mask.reshape(per_token.shape).to(per_token.dtype)
    total = (per_token * mask).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp(min=1.0)
    return total


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> Metrics:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "rewards_margin": (chosen - rejected).mean(),
        "rewards_accuracy": (chosen > rejected).float().mean(),
    }


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, *, beta: float) -> tuple[torch.Tensor, Metrics]:
    """Direct preference optimisation (sigmoid loss). ``ref_*`` None: reference-free."""
    chosen_ratio = chosen if ref_chosen is None else chosen - ref_chosen
    rejected_ratio = rejected if ref_rejected is None else rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps_chosen"] = chosen.detach().mean()
    metrics["logps_rejected"] = rejected.detach().mean()
    if ref_chosen is not None and ref_rejected is not None:
        # sequence-level estimate of KL(policy || reference) on the chosen completions
        metrics["kl_chosen"] = chosen_ratio.detach().mean()
    return loss, metrics


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean log-ratio of the KL sequences, at least 0, detached."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky optimisation on unpaired examples; ``desirable`` is a bool ``[b]``."""
    good = desirable.bool()
    ratio = logps - ref_logps
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    loss = losses.mean()
    rewards = beta * ratio.detach()
    metrics: Metrics = {"kl": kl.detach().reshape(())}
    n_good, n_bad = int(good.sum()), int((~good).sum())
    if n_good:
        metrics["rewards_chosen"] = rewards[good].sum() / n_good
        metrics["logps_chosen"] = logps.detach()[good].sum() / n_good
    if n_bad:
        metrics["rewards_rejected"] = rewards[~good].sum() / n_bad
        metrics["logps_rejected"] = logps.detach()[~good].sum() / n_bad
    if n_good and n_bad:
        metrics["rewards_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor,
              *, lam: float) -> tuple[torch.Tensor, Metrics]:
    """Odds-ratio preference optimisation. ``*_mean``: per-token mean log-probabilities of the
    completions; ``chosen_nll``: the language-model loss on the chosen sequences."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - (lam * ratio).mean()
    metrics = _reward_metrics(lam * chosen_mean, lam * rejected_mean)
    metrics["nll_loss"] = chosen_nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


def rm_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Pairwise (Bradley-Terry) reward-model loss on scalar rewards ``[b]``."""
    loss = -F.logsigmoid(chosen.float() - rejected.float()).mean()
    return loss, _reward_metrics(chosen.float(), rejected.float())


def z_loss(logits: torch.Tensor, loss_mask: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Mean squared log-partition function over the masked tokens (vocabulary-parallel)."""
    logits = logits.float()
    local_max = logits.max(dim=-1).values.detach()
    global_max = local_max.clone()
    if state.tp_size > 1:
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX,
                                     group=state.tp_group)
    sum_exp = torch.exp(logits - global_max.unsqueeze(-1)).sum(dim=-1)
    if state.tp_size > 1:
        sum_exp = reduce_from_tp_region(sum_exp, state.tp_group)
    log_z = torch.log(sum_exp) + global_max
    mask = loss_mask.reshape(log_z.shape).to(log_z.dtype)
    return (log_z.square() * mask).sum() / mask.sum().clamp(min=1.0)
