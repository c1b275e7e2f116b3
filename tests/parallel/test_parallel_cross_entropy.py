"""vocab_parallel_cross_entropy against torch.nn.functional.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed

TOL = {"atol": 1e-6, "rtol": 1e-5}
VOCAB = 16


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, VOCAB, generator=gen) * 4
    logits[0, 0] += 1000.0  # large values: the max shift must keep exp finite
    target = torch.randint(0, VOCAB, (3, 5), generator=gen)
    target[0, :4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1])  # shard edges
    upstream = torch.rand(3, 5, generator=gen)
    return logits, target, upstream


def _reference(
    logits: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float().clone().requires_grad_()
    loss = F.cross_entropy(
        x.reshape(-1, VOCAB), target.reshape(-1), reduction="none", label_smoothing=smoothing
    ).reshape(target.shape)
    loss.backward(upstream)
    return loss.detach(), x.grad


def _check(state: ParallelState, rank: int, world: int) -> None:
    logits, target, upstream = _inputs()
    for smoothing in (0.0, 0.1):
        ref_loss, ref_grad = _reference(logits, target, upstream, smoothing)
        shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, state, label_smoothing=smoothing)
        assert loss.dtype == torch.float32 and loss.shape == target.shape
        assert torch.isfinite(loss).all()
        assert_close(loss, ref_loss, **TOL)
        loss.backward(upstream)
        assert_close(shard.grad, ref_grad.chunk(world, -1)[rank], **TOL)

    # bf16 logits: computed in fp32 from the bf16 values, gradient returned in bf16
    low = logits.to(torch.bfloat16)
    ref_loss, ref_grad = _reference(low, target, upstream, 0.0)
    shard = low.chunk(world, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, state)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, **TOL)
    loss.backward(upstream)
    assert shard.grad.dtype == torch.bfloat16
    assert_close(shard.grad, ref_grad.chunk(world, -1)[rank].to(torch.bfloat16))


def _check_distributed(rank: int, world: int) -> str:
    state = ParallelState.initialize(RankTopology(world, world, 1))
    _check(state, rank, world)
    return "ok"


@pytest.mark.distributed
def test_vocab_parallel_cross_entropy_on_two_ranks() -> None:
    assert run_distributed(_check_distributed, 2) == ["ok", "ok"]


def test_single_process_matches_torch() -> None:
    _check(ParallelState.single(), 0, 1)


def test_argument_checks() -> None:
    state = ParallelState.single()
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(
            torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), state, 1.0
        )
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), state)
