"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

``temperature == 0`` is greedy (argmax; the lowest id wins a tie). Otherwise the logits are
divided by the temperature, filtered by ``top_k`` (keep the ``k`` largest, ties at the k-th value
kept too) and then ``top_p`` (keep the smallest set of most likely tokens whose probability
reaches ``top_p``; the most likely token always stays), and one token is drawn from the softmax
with the given (CPU) ``torch.Generator``. ``top_k == 0`` and ``top_p == 0`` (or 1) disable the filters.
Ids at or above ``vocab_size`` (the padding rows of the padded vocabulary) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_padding(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """``logits [..., V]`` with the ids ``>= vocab_size`` set to ``-inf``."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[..., vocab_size:] = float("-inf")
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (and ties of the k-th); the rest ``-inf``."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches ``p``; the rest ``-inf``."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits [n, V]`` (int64 ``[n]``)."""
    logits = mask_padding(logits.float(), vocab_size)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = top_p_filter(top_k_filter(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1).cpu()  # drawn on the CPU: same stream on any device
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
