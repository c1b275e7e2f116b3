"""Rotary, ALiBi, T5 buckets and sinusoidal encodings against hand-computed references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.testing import assert_close

from megatron.model.attention import SelfAttention
from megatron.model.init_methods import init_method
from megatron.model.positional import (
    RelativePositionBias,
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    query_key_distance,
    relative_position_bucket,
    sinusoidal_embedding,
)
from megatron.parallel import ParallelState
from tests.model.gpt_model_helpers import make_config


def _rotation_matrix(position: int, dim: int, base: float) -> torch.Tensor:
    """Block rotation in the rotate-half pairing: dim i with dim i + dim/2, angle
    position * base^(-2i/dim)."""
    half = dim // 2
    rot = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(half):
        theta = position * base ** (-2.0 * i / dim)
        c, s = math.cos(theta), math.sin(theta)
        rot[i, i], rot[i, i + half] = c, -s
        rot[i + half, i], rot[i + half, i + half] = s, c
    return rot


@pytest.mark.parametrize("head_dim, rotary_dim, base", [(8, 8, 10000.0), (16, 4, 100.0)])
def test_rotary_equals_a_rotation_matrix_per_position(head_dim: int, rotary_dim: int,
                                                      base: float) -> None:
    rope = RotaryEmbedding(rotary_dim, base=base, max_positions=32)
    x = torch.randn(2, 3, 5, head_dim, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 31, 0, 12]])
    cos, sin = rope(positions)
    assert cos.dtype == torch.float32 and cos.shape == (2, 1, 5, rotary_dim)
    out = apply_rotary(x, cos, sin)
    for b in range(2):
        for t in range(5):
            rot = _rotation_matrix(int(positions[b, t]), rotary_dim, base)
            expected = x[b, :, t, :rotary_dim].double() @ rot.T
            assert_close(out[b, :, t, :rotary_dim].double(), expected, rtol=1e-5, atol=1e-6)
    # dimensions past rotary_dim pass through untouched (partial rotary)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(8, base=10000.0, max_positions=64)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, *rope(torch.tensor([[m]])))
        kn = apply_rotary(k, *rope(torch.tensor([[n]])))
        return float((qm * kn).sum())

    assert score(10, 7) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(10, 7) != pytest.approx(score(10, 8), abs=1e-3)


def test_rotary_tables_stay_fp32_in_a_bf16_module() -> None:
    rope = RotaryEmbedding(8, base=10000.0, max_positions=16, save_inv_freq=True).to(torch.bfloat16)
    cos, _ = rope(torch.arange(16).view(1, 16))
    assert cos.dtype == torch.float32
    assert_close(cos[0, 0, 15, 3], torch.tensor(math.cos(15 * 10000 ** (-6 / 8))), rtol=0,
                 atol=1e-6)
    assert "inv_freq" in rope.state_dict()
    assert "inv_freq" not in RotaryEmbedding(8, base=1.0e4, max_positions=4).state_dict()


def test_alibi_slopes_for_power_of_two_and_other_head_counts() -> None:
    assert alibi_slopes(8) == [2.0 ** -k for k in range(1, 9)]
    assert alibi_slopes(4) == [0.25, 0.0625, 0.015625, 0.00390625]
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (1/2, 1/8)
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    bias = alibi_bias(torch.tensor([0.5, 0.25]), query_key_distance(3, 3, 0, torch.device("cpu")))
    expected = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [-2.0, -1.0, 0.0]])
    assert_close(bias[0, 0], expected * 0.5)
    assert_close(bias[0, 1], expected * 0.25)
    # with a KV cache offset: query at position 5 against keys 0..5
    offset = alibi_bias(torch.tensor([1.0]), query_key_distance(1, 6, 5, torch.device("cpu")))
    assert offset[0, 0, 0].tolist() == [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]


def test_alibi_slopes_are_sliced_per_tensor_parallel_rank() -> None:
    cfg = make_config(pos_emb="alibi", hidden_size=48, num_attention_heads=6)
    init = init_method("normal", std=0.02, num_layers=2, hidden_size=48)
    slopes = []
    for rank in range(2):
        # construction only reads the sizes, so a state with no process groups suffices
        state = dataclasses.replace(ParallelState.single(), tp_size=2, tp_rank=rank)
        attn = SelfAttention(cfg.model, state=state, tracker=None, sequence_parallel=False,
                             init_method=init, output_init_method=init, rotary=None)
        slopes.append(attn._slopes)
    assert slopes == [[0.25, 0.0625, 0.015625], [0.00390625, 0.5, 0.125]]


def test_t5_buckets_match_hand_computed_values() -> None:
    distances = torch.tensor([0, 1, 3, 4, 5, 7, 8, 11, 15, 16, 100, -3])
    # 8 buckets, max distance 16: exact below 4, then 4 + floor(log(n/4) / log(4) * 4), cap 7
    # n=5: log(1.25)/log(4)*4 = 0.64 -> 4;  n=8: 2.0 -> 6;  n=11: 2.92 -> 6;  n=15: 3.81 -> 7
    expected = [0, 1, 3, 4, 4, 5, 6, 6, 7, 7, 7, 0]
    assert relative_position_bucket(distances, 8, 16).tolist() == expected
    # 32 buckets, max distance 128: n=20 -> 16 + floor(log(1.25)/log(8)*16) = 17; n=64 -> 26
    assert relative_position_bucket(torch.tensor([15, 16, 20, 64, 127, 500]), 32, 128).tolist() \
        == [15, 16, 17, 26, 31, 31]


def test_relative_position_bias_is_a_table_lookup_split_over_heads() -> None:
    def table_init(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return t.copy_(torch.arange(t.numel(), dtype=t.dtype).view_as(t))

    full = RelativePositionBias(num_buckets=8, max_distance=16, num_heads=4,
                                state=ParallelState.single(), init_method=table_init)
    bias = full(4, 4)
    assert bias.shape == (1, 4, 4, 4)
    table = torch.arange(32.0).view(8, 4)
    # query 3, key 0: distance 3 -> bucket 3; query 1, key 3: future -> bucket 0
    assert_close(bias[0, :, 3, 0], table[3])
    assert_close(bias[0, :, 1, 3], table[0])
    # decoding: the query at position 10 sees key 0 at distance 10 -> bucket 6
    assert_close(full(1, 11, 10)[0, :, 0, 0], table[6])
    for rank in range(2):
        state = dataclasses.replace(ParallelState.single(), tp_size=2, tp_rank=rank)
        shard = RelativePositionBias(num_buckets=8, max_distance=16, num_heads=4, state=state,
                                     init_method=table_init)
        assert_close(shard(4, 4), bias[:, 2 * rank : 2 * rank + 2])
        assert shard.relative_attention_bias.weight.tensor_model_parallel


def test_sinusoidal_encoding_values() -> None:
    enc = sinusoidal_embedding(torch.tensor([[0, 1, 2]]), 4)
    # frequencies 1 and 1/100 for dim 4: [sin(p), sin(p/100), cos(p), cos(p/100)]
    for p in range(3):
        expected = [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
        assert_close(enc[0, p], torch.tensor(expected), rtol=1e-6, atol=1e-6)
