"""The gated MLP's fused first projection is in GPT-NeoX's layout ``[up; gate]``: the
activation is applied to the second half, and tensor-parallel rank ``r`` holds
``[up_r; gate_r]`` (what rank ``r`` of a GPT-NeoX model holds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.model.activations import fuse_gated, split_gated
from megatron.parallel.layers import split_tensor
from tests.model.gpt_model_helpers import build, make_config


def test_activation_applies_to_the_second_half() -> None:
    ffn = 16
    cfg = make_config(activation="swiglu", intermediate_size=3 * ffn, use_bias_in_mlp=True)
    mlp = build(cfg, seed=2).layers[0].mlp
    assert mlp.ffn == ffn
    w, b = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias
    x = torch.randn(5, 2, 32)
    up = x @ w[:ffn].T + b[:ffn]
    gate = x @ w[ffn:].T + b[ffn:]
    down = mlp.dense_4h_to_h
    expected = (F.silu(gate) * up) @ down.weight.T + down.bias
    out, bias = mlp(x)
    assert_close(out + bias if bias is not None else out, expected, rtol=1e-5, atol=1e-6)


def test_fused_weight_halves_and_tensor_parallel_shards() -> None:
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    fused = fuse_gated(gate, up)
    assert torch.equal(fused[:8], up) and torch.equal(fused[8:], gate)
    assert all(torch.equal(a, b) for a, b in zip(split_gated(fused), (gate, up)))
    for rank in range(2):  # stride-2 split: matching halves of both, up first
        shard = split_tensor(fused, 0, 2, rank, 2)
        rows = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(shard, torch.cat([up[rows], gate[rows]]))
