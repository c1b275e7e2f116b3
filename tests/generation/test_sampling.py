"""megatron/text_generation/sampling.py: greedy, temperature, top-k, top-p, padding rows."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.text_generation.sampling import (
    SamplingParams,
    mask_padding,
    sample_next,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG, 5.0, 3.0, 3.0, NEG]]
    assert top_k_filter(logits, 1).tolist() == [[NEG, 5.0, NEG, NEG, NEG]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the most likely token always stays
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isfinite(top_p_filter(shuffled, 0.6))[0].tolist() == [False, True, False, True]


def test_greedy_is_argmax_and_never_picks_padding():
    logits = torch.tensor([[0.1, 2.0, 0.3, 9.0], [4.0, 1.0, 0.0, 0.0]])
    assert sample_next(logits, SamplingParams()).tolist() == [3, 0]
    assert sample_next(logits, SamplingParams(), vocab_size=3).tolist() == [1, 0]
    assert mask_padding(logits, 3)[:, 3].tolist() == [NEG, NEG]


def test_sampling_respects_filters_and_is_seeded():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    params = SamplingParams(temperature=1.5, top_k=5)
    g = torch.Generator().manual_seed(123)
    draws = [int(sample_next(logits, params, g)) for _ in range(300)]
    assert set(draws) <= top5 and len(set(draws)) >= 3
    g2 = torch.Generator().manual_seed(123)
    assert draws == [int(sample_next(logits, params, g2)) for _ in range(300)]
    # the empirical frequencies follow the softmax of the tempered, filtered logits
    probs = torch.softmax(top_k_filter(logits / 1.5, 5), dim=-1)[0]
    g3 = torch.Generator().manual_seed(5)
    many = torch.tensor([int(sample_next(logits, params, g3)) for _ in range(3000)])
    for token in top5:
        freq = float((many == token).float().mean())
        assert abs(freq - float(probs[token])) < 4 * math.sqrt(0.25 / 3000) + 1e-3


def test_low_temperature_approaches_greedy_and_bad_params_fail():
    logits = torch.tensor([[1.0, 1.2, 0.9]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, SamplingParams(temperature=1e-3), g)) for _ in range(50)} \
        == {1}
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
