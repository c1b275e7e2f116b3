"""ParallelState: process groups on real gloo ranks, the mpu interface, the single state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from deepspeed.utils import bwc

from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed


def _members(group: Any, rank: int) -> list[int]:
    """Global ranks of ``group`` as seen through a collective on it."""
    size = dist.get_world_size(group)
    out = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(out, torch.tensor([rank]), group=group)
    return [int(t.item()) for t in out]


def _check_state(rank: int, world_size: int) -> list[dict[str, Any]]:
    reports = []
    for tp, pp in ((2, 2), (2, 1), (1, 2)):
        topo = RankTopology(world_size, tp, pp)
        state = ParallelState.initialize(topo, sequence_parallel=True)
        reports.append(
            {
                "coords": (state.pp_rank, state.dp_rank, state.tp_rank),
                "sizes": (state.pp_size, state.dp_size, state.tp_size),
                "tp": _members(state.tp_group, rank),
                "dp": _members(state.dp_group, rank),
                "pp": _members(state.pp_group, rank),
                "model": _members(state.model_group, rank),
                "embedding": _members(state.embedding_group, rank),
                "ranks": (state.tp_ranks, state.dp_ranks, state.pp_ranks, state.model_ranks),
                "embedding_ranks": state.embedding_ranks,
                "mpu": (
                    state.get_model_parallel_rank(),
                    state.get_model_parallel_world_size(),
                    state.get_tensor_model_parallel_rank(),
                    state.get_tensor_model_parallel_world_size(),
                    state.get_slice_parallel_rank(),
                    state.get_slice_parallel_world_size(),
                    state.get_data_parallel_rank(),
                    state.get_data_parallel_world_size(),
                    state.get_pipe_parallel_rank(),
                    state.get_pipe_parallel_world_size(),
                    state.get_pipeline_model_parallel_rank(),
                    state.get_pipeline_model_parallel_world_size(),
                    state.get_global_rank(),
                ),
                "same_groups": (
                    state.get_model_parallel_group() is state.tp_group,
                    state.get_tensor_model_parallel_group() is state.tp_group,
                    state.get_slice_parallel_group() is state.tp_group,
                    state.get_data_parallel_group() is state.dp_group,
                    state.get_pipe_parallel_group() is state.pp_group,
                    state.get_pipeline_model_parallel_group() is state.pp_group,
                ),
                "src": state.get_tensor_model_parallel_src_rank(),
                "dp_group_ranks": state.get_data_parallel_group_ranks(),
                "stages": (state.is_pipeline_first_stage(), state.is_pipeline_last_stage()),
                "bwc": (
                    bwc.bwc_tensor_model_parallel_rank(state),
                    bwc.bwc_tensor_model_parallel_world_size(state),
                    bwc.bwc_pipeline_parallel_world_size(state),
                    bwc.bwc_tensor_model_parallel_group(state) is state.tp_group,
                    bwc.bwc_pipeline_parallel_group(state) is state.pp_group,
                ),
                "sequence_parallel": state.sequence_parallel,
            }
        )
    with pytest.raises(ValueError, match="topology is for 8 ranks"):
        ParallelState.initialize(RankTopology(8, 2, 2))
    return reports


@pytest.mark.distributed
def test_groups_on_four_ranks() -> None:
    results = run_distributed(_check_state, 4)
    for case, (tp, pp) in enumerate(((2, 2), (2, 1), (1, 2))):
        topo = RankTopology(4, tp, pp)
        for rank, reports in enumerate(results):
            rep = reports[case]
            p, d, t = topo.coords(rank)
            assert rep["coords"] == (p, d, t)
            assert rep["sizes"] == (pp, topo.data_parallel, tp)
            assert rep["tp"] == topo.group_of(topo.tensor_groups(), rank)
            assert rep["dp"] == topo.group_of(topo.data_groups(), rank)
            assert rep["pp"] == topo.group_of(topo.pipe_groups(), rank)
            assert rep["model"] == topo.group_of(topo.model_groups(), rank)
            assert rep["embedding"] == topo.group_of(topo.embedding_groups(), rank)
            assert rep["ranks"] == (tuple(rep["tp"]), tuple(rep["dp"]), tuple(rep["pp"]),
                                    tuple(rep["model"]))  # fmt: skip
            assert list(rep["embedding_ranks"]) == rep["embedding"]
            dp = topo.data_parallel
            assert rep["mpu"] == (t, tp, t, tp, t, tp, d, dp, p, pp, p, pp, rank)
            assert all(rep["same_groups"])
            assert rep["src"] == rep["tp"][0]
            assert rep["dp_group_ranks"] == rep["dp"]
            assert rep["stages"] == (p == 0, p == pp - 1)
            assert rep["bwc"] == (t, tp, pp, True, True)
            assert rep["sequence_parallel"] == (tp > 1)


def test_single_state_has_no_groups() -> None:
    state = ParallelState.single()
    assert (state.tp_size, state.pp_size, state.dp_size) == (1, 1, 1)
    assert (state.tp_rank, state.pp_rank, state.dp_rank, state.rank) == (0, 0, 0, 0)
    assert state.tp_group is None and state.dp_group is None and state.pp_group is None
    assert state.model_group is None and state.embedding_group is None
    assert state.is_single and state.is_pipeline_first_stage() and state.is_pipeline_last_stage()
    assert state.get_model_parallel_world_size() == 1
    assert state.get_data_parallel_group_ranks() == [0]
    assert state.deepspeed_topology().world_size() == 1
    # DeepSpeed must not mistake the state for a Ulysses sequence-parallel mpu
    assert not hasattr(state, "get_sequence_parallel_world_size")
    assert not hasattr(state, "initialize_sequence_parallel")
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ParallelState.initialize(RankTopology(1, 1, 1))
