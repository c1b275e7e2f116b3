"""The multi-process test harness itself: results, errors, deaths and hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedTimeout, RankFailed, run_distributed

pytestmark = pytest.mark.distributed


def _sum_ranks(rank: int, world_size: int, scale: int, *, offset: int = 0) -> dict[str, object]:
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return {
        "rank": rank,
        "dist_rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": x.item() * scale + offset,
        "env": (os.environ["MASTER_ADDR"], os.environ["DS_ACCELERATOR"], os.environ["RANK"]),
    }


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()


def _exit_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    dist.barrier()


def _sleep_forever_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        while True:
            time.sleep(0.1)
    dist.barrier()


def test_results_ordered_by_rank_with_args_and_kwargs() -> None:
    results = run_distributed(_sum_ranks, 3, 10, offset=1)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert [r["dist_rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 for r in results)
    assert all(r["sum"] == (0 + 1 + 2) * 10 + 1 for r in results)
    assert [r["env"] for r in results] == [("127.0.0.1", "cpu", str(i)) for i in range(3)]


def test_rank_exception_is_reported_with_traceback() -> None:
    with pytest.raises(RankFailed) as info:
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    message = str(info.value)
    assert info.value.rank == 1
    assert "rank 1 of 2 failed" in message
    assert "ValueError: deliberate failure on rank one" in message
    assert "_raise_on_rank_one" in message  # the frame of the child's traceback


def test_rank_dying_is_reported() -> None:
    with pytest.raises(RankFailed) as info:
        run_distributed(_exit_on_rank_zero, 2, timeout=60)
    assert info.value.rank == 0
    assert "exited with code 3" in str(info.value)


def test_hang_is_detected_and_stacks_dumped() -> None:
    with pytest.raises(DistributedTimeout) as info:
        run_distributed(_sleep_forever_on_rank_one, 2, timeout=5)
    message = str(info.value)
    assert "did not finish within 5 s" in message
    assert "--- rank 1 stacks ---" in message
    assert "_sleep_forever_on_rank_one" in message  # rank 1's Python stack
    assert "--- rank 0 stacks ---" in message
