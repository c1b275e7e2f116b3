"""RNG tracker: per-shard dropout streams, seeding, checkpoint state and recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.parallel.activation_checkpointing import checkpoint
from megatron.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_seed,
)
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed

SEED = 1234


def _dropout_mask(n: int = 256) -> torch.Tensor:
    return F.dropout(torch.ones(n), p=0.5, training=True) != 0


def _draw(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    # tp = 2: the fork stream differs per shard, the default stream does not
    state = ParallelState.initialize(RankTopology(world, world, 1))
    tracker = model_parallel_seed(SEED, state)
    out["outside_before"] = _dropout_mask()
    with tracker.fork():
        out["inside_rand"] = torch.rand(4)
        out["inside"] = _dropout_mask()
    out["outside_after"] = _dropout_mask()
    # pp = 2: the default seed is offset by 100 per stage
    state = ParallelState.initialize(RankTopology(world, 1, world))
    tracker = model_parallel_seed(SEED, state)
    out["pp_default_rand"] = torch.rand(4)
    with tracker.fork(MODEL_PARALLEL_RNG):
        out["pp_fork_rand"] = torch.rand(4)
    return out


def _expected_rand(seed: int) -> torch.Tensor:
    return torch.rand(4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.distributed
def test_dropout_masks_across_tensor_parallel_ranks() -> None:
    r0, r1 = run_distributed(_draw, 2)
    # replicated activations: identical masks on every TP rank
    assert torch.equal(r0["outside_before"], r1["outside_before"])
    assert torch.equal(r0["outside_after"], r1["outside_after"])
    # sharded activations: independent masks per TP rank
    assert not torch.equal(r0["inside"], r1["inside"])
    # the documented seeds
    for rank, res in enumerate((r0, r1)):
        assert torch.equal(res["inside_rand"], _expected_rand(SEED + 2718 + rank))
        assert torch.equal(res["pp_default_rand"], _expected_rand(SEED + 100 * rank))
        assert torch.equal(res["pp_fork_rand"], _expected_rand(SEED + 100 * rank + 2718))


def test_fork_leaves_default_stream_and_continues_its_own() -> None:
    tracker = RNGStatesTracker()
    tracker.add("a", 7)
    torch.manual_seed(99)
    expected_default = torch.rand(6)
    torch.manual_seed(99)
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(6), expected_default)  # default stream untouched
    with tracker.fork("a"):
        second = torch.rand(3)
    assert torch.equal(torch.cat([first, second]), _expected_rand_n(7, 6))
    # checkpointing the states: restore and replay
    saved = tracker.get_states()
    with tracker.fork("a"):
        third = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), third)
    # errors
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 8)
    with pytest.raises(ValueError, match="seed 7 already used"):
        tracker.add("b", 7)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass


def _expected_rand_n(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _block(tracker: RNGStatesTracker, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ weight)
    with tracker.fork():
        h = F.dropout(h, p=0.5, training=True)  # "inside a TP region"
    h = F.dropout(h * 2.0, p=0.3, training=True)  # default stream
    return h.sin()


def _run(mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    weight = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(8, 16, requires_grad=True)
    tracker = model_parallel_seed(SEED, ParallelState.single())
    with tracker.fork():
        torch.rand(5)  # the stream has already advanced before the block
    if mode == "plain":
        out = _block(tracker, weight, x)
    elif mode == "checkpoint":
        out = checkpoint(lambda w, inp: _block(tracker, w, inp), tracker, weight, x)
    else:  # torch's checkpoint alone does not know about the tracker
        out = checkpoint(lambda w, inp: _block(tracker, w, inp), None, weight, x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), x.grad, weight.grad, tracker.get_states()


def test_checkpoint_recompute_reproduces_forked_dropout() -> None:
    out_p, gx_p, gw_p, states_p = _run("plain")
    out_c, gx_c, gw_c, states_c = _run("checkpoint")
    assert_close(out_c, out_p, atol=0, rtol=0)
    assert_close(gx_c, gx_p, atol=0, rtol=0)
    assert_close(gw_c, gw_p, atol=0, rtol=0)
    # recomputation does not advance the tracker's streams
    assert states_c.keys() == states_p.keys()
    for name in states_p:
        assert torch.equal(states_c[name], states_p[name])
    # without restoring the tracker the recomputed mask differs and gradients are wrong
    out_n, gx_n, _, _ = _run("untracked")
    assert_close(out_n, out_p, atol=0, rtol=0)
    assert not torch.allclose(gx_n, gx_p)
