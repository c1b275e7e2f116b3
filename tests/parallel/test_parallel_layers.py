"""Tensor-parallel layers on 2 gloo ranks against the dense (TP=1) layers from the same seed."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_tensor,
    merge_shards,
    param_is_not_tp_duplicate,
    register_sequence_parallel_grad_hooks,
    shard_tensor,
    split_tensor,
)
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed

TOL = {"atol": 1e-6, "rtol": 1e-5}
EXACT = {"atol": 0.0, "rtol": 0.0}
init = functools.partial(torch.nn.init.normal_, mean=0.0, std=0.5)


def _same(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same random tensor on every rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pair(
    cls: type, seed: int, state: ParallelState, *args: int, **kwargs: object
) -> tuple[Any, Any]:
    """The dense (TP=1) layer and the parallel layer built from the same seed, with the same
    non-zero bias."""
    torch.manual_seed(seed)
    dense = cls(*args, state=ParallelState.single(), init_method=init, **kwargs)
    torch.manual_seed(seed)
    par = cls(*args, state=state, init_method=init, **kwargs)
    if getattr(dense, "bias", None) is not None:
        with torch.no_grad():
            dense.bias.copy_(_same(dense.bias.shape, seed + 1))
            if par.bias.shape == dense.bias.shape:
                par.bias.copy_(dense.bias)
            else:
                stride = getattr(par, "partition_stride", 1)
                par.bias.copy_(shard_tensor(dense.bias, 0, state, stride))
    return dense, par


def _check_column(state: ParallelState, rank: int) -> None:
    for gather in (False, True):
        dense, par = _pair(ColumnParallelLinear, 10, state, 8, 12, gather_output=gather)
        # TP-invariant init: the shard is exactly the slice of the dense weight
        assert_close(par.weight, dense.weight.chunk(2, 0)[rank], **EXACT)
        assert par.weight.tensor_model_parallel and par.weight.partition_dim == 0
        x = _same((4, 3, 8), 11)
        xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        up = _same((4, 3, 12), 12)
        out_d, out_p = dense(xd), par(xp)
        if gather:
            assert_close(out_p, out_d, **TOL)
            out_p.backward(up)
        else:
            assert_close(out_p, out_d.chunk(2, -1)[rank], **TOL)
            out_p.backward(up.chunk(2, -1)[rank])
        out_d.backward(up)
        assert_close(xp.grad, xd.grad, **TOL)
        assert_close(par.weight.grad, dense.weight.grad.chunk(2, 0)[rank], **TOL)
        assert_close(par.bias.grad, dense.bias.grad.chunk(2, 0)[rank], **TOL)
        assert_close(gather_tensor(par.weight, 0, state), dense.weight, **EXACT)


def _check_column_stride(state: ParallelState, rank: int) -> None:
    """Fused [up; gate] with stride 2: each rank holds matching up and gate halves."""
    ffn = 6
    for gather in (False, True):
        dense, par = _pair(
            ColumnParallelLinear, 20, state, 8, 2 * ffn, gather_output=gather, partition_stride=2
        )
        up_w, gate_w = dense.weight[:ffn], dense.weight[ffn:]
        local_up, local_gate = par.weight.chunk(2, 0)
        assert_close(local_up, up_w.chunk(2, 0)[rank], **EXACT)
        assert_close(local_gate, gate_w.chunk(2, 0)[rank], **EXACT)
        assert par.weight.partition_stride == 2
        x = _same((5, 8), 21)
        xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_d, out_p = dense(xd), par(xp)
        if gather:
            assert_close(out_p, out_d, **TOL)
            loss_p = (out_p[:, :ffn] * torch.sigmoid(out_p[:, ffn:])).sum()
        else:
            u, gt = out_p.chunk(2, -1)
            assert_close(u, out_d[:, :ffn].chunk(2, -1)[rank], **TOL)
            assert_close(gt, out_d[:, ffn:].chunk(2, -1)[rank], **TOL)
            # a swiglu-like product of the local halves sums to the dense one over ranks
            loss_p = (u * torch.sigmoid(gt)).sum()
        loss_d = (out_d[:, :ffn] * torch.sigmoid(out_d[:, ffn:])).sum()
        loss_p.backward()
        loss_d.backward()
        if gather:
            assert_close(xp.grad, xd.grad, **TOL)
        assert_close(par.weight.grad, split_tensor(dense.weight.grad, 0, 2, rank, 2), **TOL)
        assert_close(par.bias.grad, split_tensor(dense.bias.grad, 0, 2, rank, 2), **TOL)
        assert_close(gather_tensor(par.weight, 0, state, stride=2), dense.weight, **EXACT)
        assert_close(shard_tensor(dense.weight, 0, state, stride=2), par.weight, **EXACT)


def _check_row(state: ParallelState, rank: int) -> None:
    for parallel_input in (True, False):
        dense, par = _pair(RowParallelLinear, 30, state, 12, 8, input_is_parallel=parallel_input)
        assert_close(par.weight, dense.weight.chunk(2, 1)[rank], **EXACT)
        assert par.weight.partition_dim == 1 and not par.bias.tensor_model_parallel
        x = _same((4, 3, 12), 31)
        xd = x.clone().requires_grad_()
        xp = (x.chunk(2, -1)[rank] if parallel_input else x).clone().requires_grad_()
        up = _same((4, 3, 8), 32)
        out_d, out_p = dense(xd), par(xp)
        assert_close(out_p, out_d, **TOL)
        out_d.backward(up)
        out_p.backward(up)
        expected_x_grad = xd.grad.chunk(2, -1)[rank] if parallel_input else xd.grad
        assert_close(xp.grad, expected_x_grad, **TOL)
        assert_close(par.weight.grad, dense.weight.grad.chunk(2, 1)[rank], **TOL)
        assert_close(par.bias.grad, dense.bias.grad, **TOL)  # bias added once, after the sum
        assert_close(gather_tensor(par.weight, 1, state), dense.weight, **EXACT)


def _check_skip_bias(state: ParallelState, rank: int) -> None:
    dense, par = _pair(RowParallelLinear, 35, state, 12, 8, skip_bias_add=True)
    x = _same((3, 12), 36)
    out = par(x.chunk(2, -1)[rank])
    assert par.output_bias is par.bias
    assert_close(out + par.output_bias, F.linear(x, dense.weight, dense.bias), **TOL)
    dense, par = _pair(ColumnParallelLinear, 37, state, 8, 12, skip_bias_add=True)
    x = _same((3, 8), 38)
    out = par(x) + par.output_bias
    assert_close(out, F.linear(x, dense.weight, dense.bias).chunk(2, -1)[rank], **TOL)


def _mlp_pair(state: ParallelState, seed: int, sp: bool) -> tuple[list, list]:
    layers = []
    for st in (ParallelState.single(), state):
        torch.manual_seed(seed)
        fc1 = ColumnParallelLinear(8, 16, state=st, init_method=init, sequence_parallel_input=sp)
        fc2 = RowParallelLinear(16, 8, state=st, init_method=init, sequence_parallel_output=sp)
        with torch.no_grad():
            fc1.bias.copy_(shard_tensor(_same((16,), seed + 1), 0, st))
            fc2.bias.copy_(_same((8,), seed + 2))
        layers.append([fc1, fc2])
    return layers[0], layers[1]


def _check_mlp(state: ParallelState, rank: int) -> None:
    for sp in (False, True):
        (d1, d2), (p1, p2) = _mlp_pair(state, 40, sp)
        x = _same((4, 3, 8), 41)  # [seq, batch, hidden]
        up = _same((4, 3, 8), 42)
        xd = x.clone().requires_grad_()
        out_d = d2(F.gelu(d1(xd)))
        out_d.backward(up)
        if sp:  # activations split along the sequence outside the TP region
            register_sequence_parallel_grad_hooks(torch.nn.ModuleList([p1, p2]), state)
            xp = x.chunk(2, 0)[rank].clone().requires_grad_()
            out_p = p2(F.gelu(p1(xp)))
            assert out_p.shape == (2, 3, 8)
            assert_close(out_p, out_d.chunk(2, 0)[rank], **TOL)
            out_p.backward(up.chunk(2, 0)[rank])
            assert_close(xp.grad, xd.grad.chunk(2, 0)[rank], **TOL)
            assert p2.bias.sequence_parallel
        else:
            xp = x.clone().requires_grad_()
            out_p = p2(F.gelu(p1(xp)))
            assert_close(out_p, out_d, **TOL)
            out_p.backward(up)
            assert_close(xp.grad, xd.grad, **TOL)
        assert_close(p1.weight.grad, d1.weight.grad.chunk(2, 0)[rank], **TOL)
        assert_close(p1.bias.grad, d1.bias.grad.chunk(2, 0)[rank], **TOL)
        assert_close(p2.weight.grad, d2.weight.grad.chunk(2, 1)[rank], **TOL)
        assert_close(p2.bias.grad, d2.bias.grad, **TOL)
        assert param_is_not_tp_duplicate(p1.weight, state)
        assert param_is_not_tp_duplicate(p2.bias, state) == (rank == 0)


def _check_embedding(state: ParallelState, rank: int) -> None:
    dense, par = _pair(VocabParallelEmbedding, 50, state, 10, 4)
    assert (par.vocab_start, par.vocab_end) == (5 * rank, 5 * rank + 5)
    assert_close(par.weight, dense.weight.chunk(2, 0)[rank], **EXACT)
    ids = torch.tensor([[0, 9, 4, 5], [7, 7, 2, 1], [3, 8, 6, 9]])  # both halves, repeats
    out_d, out_p = dense(ids), par(ids)
    assert_close(out_p, out_d, **EXACT)
    assert_close(out_d, F.embedding(ids, dense.weight), **EXACT)
    up = _same((3, 4, 4), 51)
    out_d.backward(up)
    out_p.backward(up)
    assert_close(par.weight.grad, dense.weight.grad.chunk(2, 0)[rank], **TOL)


def _check_bf16_and_errors(state: ParallelState, rank: int) -> None:
    torch.manual_seed(60)
    dense = ColumnParallelLinear(8, 12, state=ParallelState.single(), init_method=init)
    torch.manual_seed(60)
    par = ColumnParallelLinear(
        8, 12, state=state, init_method=init, params_dtype=torch.bfloat16, bias=False
    )
    assert par.weight.dtype == torch.bfloat16 and par.bias is None
    assert_close(par.weight, dense.weight.chunk(2, 0)[rank].to(torch.bfloat16), **EXACT)
    with pytest.raises(ValueError, match=r"out_features 7 is not divisible by tensor_parallel 2"):
        ColumnParallelLinear(8, 7, state=state, init_method=init)
    with pytest.raises(ValueError, match=r"tensor_parallel 2 x partition_stride 2 = 4"):
        ColumnParallelLinear(8, 6, state=state, init_method=init, partition_stride=2)
    with pytest.raises(ValueError, match=r"in_features 9 is not divisible by tensor_parallel 2"):
        RowParallelLinear(9, 4, state=state, init_method=init)
    with pytest.raises(ValueError, match=r"num_embeddings 11 is not divisible"):
        VocabParallelEmbedding(11, 4, state=state, init_method=init)


def _check_layers(rank: int, world: int) -> str:
    state = ParallelState.initialize(RankTopology(world, world, 1))
    _check_column(state, rank)
    _check_column_stride(state, rank)
    _check_row(state, rank)
    _check_skip_bias(state, rank)
    _check_mlp(state, rank)
    _check_embedding(state, rank)
    _check_bf16_and_errors(state, rank)
    return "ok"


@pytest.mark.distributed
def test_layers_on_two_ranks_match_dense() -> None:
    assert run_distributed(_check_layers, 2) == ["ok", "ok"]


def test_single_state_layers_equal_torch_functional() -> None:
    state = ParallelState.single()
    torch.manual_seed(0)
    col = ColumnParallelLinear(6, 10, state=state, init_method=init, gather_output=True)
    row = RowParallelLinear(10, 6, state=state, init_method=init, input_is_parallel=False)
    emb = VocabParallelEmbedding(7, 6, state=state, init_method=init)
    with torch.no_grad():
        col.bias.normal_()
        row.bias.normal_()
    x = torch.randn(3, 6)
    assert torch.equal(col(x), F.linear(x, col.weight, col.bias))
    h = torch.randn(3, 10)
    assert torch.equal(row(h), F.linear(h, row.weight, row.bias))
    ids = torch.tensor([[0, 6, 3]])
    assert torch.equal(emb(ids), F.embedding(ids, emb.weight))
    # same weights in torch.nn modules give the same outputs
    ref = torch.nn.Linear(6, 10)
    ref.load_state_dict(col.state_dict())
    assert torch.equal(col(x), ref(x))
    ref_emb = torch.nn.Embedding(7, 6)
    ref_emb.load_state_dict(emb.state_dict())
    assert torch.equal(emb(ids), ref_emb(ids))
    # not sharded at TP=1, so nothing to de-duplicate in a gradient norm
    assert not col.weight.tensor_model_parallel
    assert param_is_not_tp_duplicate(row.bias, state)


def test_init_is_seeded_zero_bias_and_init_method_used() -> None:
    state = ParallelState.single()
    torch.manual_seed(3)
    a = ColumnParallelLinear(4, 6, state=state, init_method=init)
    torch.manual_seed(3)
    expected = torch.empty(6, 4)
    init(expected)
    assert torch.equal(a.weight.detach(), expected)
    assert torch.equal(a.bias.detach(), torch.zeros(6))
    b = RowParallelLinear(4, 6, state=state, init_method=torch.nn.init.ones_)
    assert torch.equal(b.weight.detach(), torch.ones(6, 4))
    assert torch.equal(b.bias.detach(), torch.zeros(6))


@pytest.mark.parametrize(("world", "stride"), [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
def test_split_and_merge_are_inverse(world: int, stride: int) -> None:
    full = torch.arange(world * stride * 2 * 5, dtype=torch.float32).reshape(-1, 5)
    shards = [split_tensor(full, 0, world, r, stride) for r in range(world)]
    assert all(s.shape == (full.shape[0] // world, 5) for s in shards)
    assert torch.equal(merge_shards(shards, 0, stride), full)
    cols = [split_tensor(full.T, 1, world, r, stride) for r in range(world)]
    assert torch.equal(merge_shards(cols, 1, stride), full.T)
    if stride == 2:  # [a; b] -> rank r holds [a_r; b_r]
        a, b = full.chunk(2, 0)
        for r, s in enumerate(shards):
            top, bottom = s.chunk(2, 0)
            assert torch.equal(top, a.chunk(world, 0)[r])
            assert torch.equal(bottom, b.chunk(world, 0)[r])
