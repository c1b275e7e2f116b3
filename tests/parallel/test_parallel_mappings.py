"""Tensor- and sequence-parallel mappings: forward values and gradients on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megatron.parallel import mappings as M
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed


def _rank_tensor(shape: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000 * rank)
    return torch.randn(shape, generator=gen)


def _check_mappings(rank: int, world: int) -> str:
    state = ParallelState.initialize(RankTopology(world, world, 1))
    g = state.tp_group
    full = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(0))  # same on all ranks
    mine = _rank_tensor((6, 3, 8), rank, 1)
    all_mine = [_rank_tensor((6, 3, 8), r, 1) for r in range(world)]
    upstream = _rank_tensor((6, 3, 8), rank, 2)  # a different upstream grad on every rank
    all_upstream = [_rank_tensor((6, 3, 8), r, 2) for r in range(world)]
    total_upstream = sum(all_upstream)

    # copy: identity forward, all-reduce backward
    x = mine.clone().requires_grad_()
    y = M.copy_to_tp_region(x, g)
    assert_close(y, mine, rtol=0, atol=0)
    y.backward(upstream)
    assert_close(x.grad, total_upstream)

    # reduce: all-reduce forward, identity backward; input untouched
    x = mine.clone().requires_grad_()
    y = M.reduce_from_tp_region(x, g)
    assert_close(y, sum(all_mine))
    assert_close(x, mine, rtol=0, atol=0)
    y.backward(upstream)
    assert_close(x.grad, upstream, rtol=0, atol=0)

    # scatter (last dim): own chunk forward, all-gather backward
    x = full.clone().requires_grad_()
    y = M.scatter_to_tp_region(x, g)
    assert_close(y, full.chunk(world, -1)[rank], rtol=0, atol=0)
    up = upstream.chunk(world, -1)[0]
    y.backward(up)
    assert_close(x.grad, torch.cat([u.chunk(world, -1)[0] for u in all_upstream], -1))

    # gather (last dim): all-gather forward, own chunk backward
    x = mine.clone().requires_grad_()
    y = M.gather_from_tp_region(x, g)
    assert_close(y, torch.cat(all_mine, -1), rtol=0, atol=0)
    y.backward(torch.cat([upstream] * world, -1) * (rank + 1))
    assert_close(x.grad, upstream * (rank + 1), rtol=0, atol=0)

    # round trips
    assert_close(M.gather_from_tp_region(M.scatter_to_tp_region(full, g), g), full, rtol=0, atol=0)
    sp = M.scatter_to_sequence_parallel_region(full, g)
    assert_close(M.gather_from_sequence_parallel_region(sp, g), full, rtol=0, atol=0)

    # sequence scatter (first dim): own chunk forward, all-gather backward
    x = full.clone().requires_grad_()
    y = M.scatter_to_sequence_parallel_region(x, g)
    assert y.shape == (6 // world, 3, 8)
    assert_close(y, full.chunk(world, 0)[rank], rtol=0, atol=0)
    y.backward(upstream.chunk(world, 0)[0])
    assert_close(x.grad, torch.cat([u.chunk(world, 0)[0] for u in all_upstream], 0))

    # sequence gather: all-gather forward, reduce-scatter backward (or split)
    x = mine.clone().requires_grad_()
    y = M.gather_from_sequence_parallel_region(x, g)
    assert_close(y, torch.cat(all_mine, 0), rtol=0, atol=0)
    big_up = torch.cat([upstream] * world, 0)
    y.backward(big_up)
    assert_close(x.grad, sum(torch.cat([u] * world, 0) for u in all_upstream).chunk(world, 0)[rank])
    x = mine.clone().requires_grad_()
    y = M.gather_from_sequence_parallel_region(x, g, tensor_parallel_output_grad=False)
    y.backward(big_up)
    assert_close(x.grad, upstream, rtol=0, atol=0)

    # reduce-scatter: reduce-scatter forward, all-gather backward
    x = mine.clone().requires_grad_()
    y = M.reduce_scatter_to_sequence_parallel_region(x, g)
    assert_close(y, sum(all_mine).chunk(world, 0)[rank])
    y.backward(upstream.chunk(world, 0)[0])
    assert_close(x.grad, torch.cat([u.chunk(world, 0)[0] for u in all_upstream], 0))

    # the all-reduce fallback for reduce-scatter gives the same result
    native = M.reduce_scatter_first_dim(mine, g)
    fallback = M.reduce_scatter_first_dim(mine, g, native=False)
    assert_close(fallback, native)
    assert_close(native, sum(all_mine).chunk(world, 0)[rank])

    # a backend without reduce-scatter (older gloo) raises "not supported": fall back;
    # any other error propagates
    name = (
        "reduce_scatter_single"
        if hasattr(M.dist, "reduce_scatter_single")
        else ("reduce_scatter_tensor")
    )
    original = getattr(M.dist, name)

    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ProcessGroupGloo does not support reduce_scatter")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("connection reset by peer")

    try:
        setattr(M.dist, name, unsupported)
        assert_close(M.reduce_scatter_first_dim(mine, g), native)
        setattr(M.dist, name, broken)
        with pytest.raises(RuntimeError, match="connection reset"):
            M.reduce_scatter_first_dim(mine, g)
    finally:
        setattr(M.dist, name, original)

    # uneven splits are refused with the sizes in the message
    with pytest.raises(ValueError, match="size 7 is not divisible by the group size 2"):
        M.scatter_to_sequence_parallel_region(torch.zeros(7, 2), g)
    return "ok"


@pytest.mark.distributed
def test_mappings_on_two_ranks() -> None:
    assert run_distributed(_check_mappings, 2) == ["ok", "ok"]


def test_mappings_are_identity_without_group() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    for fn in (
        M.copy_to_tp_region,
        M.reduce_from_tp_region,
        M.scatter_to_tp_region,
        M.gather_from_tp_region,
        M.scatter_to_sequence_parallel_region,
        M.gather_from_sequence_parallel_region,
        M.reduce_scatter_to_sequence_parallel_region,
    ):
        assert fn(x, None) is x
    assert M.reduce_scatter_first_dim(x, None) is x
