"""RankTopology: layout, group families and equality with DeepSpeed's topology."""

from __future__ import annotations

import itertools

import pytest

from megatron.parallel.topology import RankTopology

# (world, tp, pp): the 512-rank TP8 x PP8 x DP8 grid, degenerate axes, odd sizes.
SHAPES = [
    (512, 8, 8),
    (512, 1, 1),
    (512, 512, 1),
    (512, 1, 512),
    (96, 4, 3),
    (45, 3, 5),
    (30, 5, 3),
    (7, 7, 1),
    (7, 1, 7),
    (8, 2, 2),
    (1, 1, 1),
]


def _families(topo: RankTopology) -> dict[str, list[list[int]]]:
    return {
        "tensor": topo.tensor_groups(),
        "data": topo.data_groups(),
        "pipe": topo.pipe_groups(),
        "model": topo.model_groups(),
    }


@pytest.mark.parametrize(("world", "tp", "pp"), SHAPES)
def test_layout_and_partitions(world: int, tp: int, pp: int) -> None:
    topo = RankTopology(world, tp, pp)
    dp = world // (tp * pp)
    assert topo.data_parallel == dp
    assert topo.model_parallel == tp * pp

    # the documented formula, and coords/rank are inverse bijections
    for p, d, t in itertools.product(range(pp), range(dp), range(tp)):
        r = topo.rank(p, d, t)
        assert r == p * (dp * tp) + d * tp + t
        assert topo.coords(r) == (p, d, t)
    assert sorted(topo.rank(*topo.coords(r)) for r in range(world)) == list(range(world))

    sizes = {"tensor": tp, "data": dp, "pipe": pp, "model": tp * pp}
    counts = {"tensor": dp * pp, "data": tp * pp, "pipe": tp * dp, "model": dp}
    for name, groups in _families(topo).items():
        members = [r for g in groups for r in g]
        # every rank exactly once: a partition, hence no overlap
        assert sorted(members) == list(range(world)), name
        assert len(groups) == counts[name], name
        assert all(len(g) == sizes[name] for g in groups), name

    for g in topo.tensor_groups():
        cs = [topo.coords(r) for r in g]
        assert len({(p, d) for p, d, _ in cs}) == 1 and [t for *_, t in cs] == list(range(tp))
    for g in topo.data_groups():
        cs = [topo.coords(r) for r in g]
        assert len({(p, t) for p, _, t in cs}) == 1 and [d for _, d, _ in cs] == list(range(dp))
    for g in topo.pipe_groups():
        cs = [topo.coords(r) for r in g]
        assert len({(d, t) for _, d, t in cs}) == 1 and [p for p, _, _ in cs] == list(range(pp))
    for g in topo.model_groups():
        cs = [topo.coords(r) for r in g]
        assert len({d for _, d, _ in cs}) == 1
        assert sorted((p, t) for p, _, t in cs) == list(itertools.product(range(pp), range(tp)))

    # embedding groups: first + last stage of each pipeline, middle stages in none
    emb = topo.embedding_groups()
    assert len(emb) == dp * tp
    members = [r for g in emb for r in g]
    assert len(members) == len(set(members))
    edge_stages = {0, pp - 1}
    assert sorted(members) == sorted(r for r in range(world) if topo.coords(r)[0] in edge_stages)
    for g, pipe in zip(emb, topo.pipe_groups()):
        assert g == ([pipe[0]] if pp == 1 else [pipe[0], pipe[-1]])

    # group_of finds the rank's own group
    for r in (0, world // 2, world - 1):
        p, d, t = topo.coords(r)
        assert topo.group_of(topo.tensor_groups(), r) == [topo.rank(p, d, x) for x in range(tp)]


@pytest.mark.parametrize(("world", "tp", "pp"), SHAPES)
def test_matches_deepspeed_topology(world: int, tp: int, pp: int) -> None:
    topo = RankTopology(world, tp, pp)
    ds = topo.to_deepspeed()
    assert ds.get_axis_names() == ["pipe", "data", "model"]
    assert ds.world_size() == world
    assert (ds.get_dim("pipe"), ds.get_dim("data"), ds.get_dim("model")) == (
        pp,
        topo.data_parallel,
        tp,
    )
    assert topo.tensor_groups() == ds.get_axis_comm_lists("model")
    assert topo.data_groups() == ds.get_axis_comm_lists("data")
    assert topo.pipe_groups() == ds.get_axis_comm_lists("pipe")
    assert topo.model_groups() == [
        sorted(ds.filter_match(data=d)) for d in range(topo.data_parallel)
    ]
    for p, d, t in itertools.product(range(pp), range(topo.data_parallel), range(tp)):
        assert ds.get_rank(pipe=p, data=d, model=t) == topo.rank(p, d, t)


def test_invalid_shapes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"world_size 12 is not divisible by tensor_parallel 5"):
        RankTopology(12, 5, 1)
    with pytest.raises(ValueError, match=r"tensor_parallel 4 x pipe_parallel 4 = 16"):
        RankTopology(24, 4, 4)
    with pytest.raises(ValueError, match="positive"):
        RankTopology(8, 0, 1)
    with pytest.raises(ValueError, match="positive"):
        RankTopology(0, 1, 1)
    topo = RankTopology(8, 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        topo.coords(8)
    with pytest.raises(ValueError, match="out of range"):
        topo.rank(0, 2, 0)


@pytest.mark.parametrize("world,tp,pp,ep",
                         [(8, 1, 1, 2), (8, 2, 1, 2), (16, 2, 2, 2), (8, 1, 1, 4)])
def test_expert_groups_tile_each_data_parallel_group(world: int, tp: int, pp: int,
                                                     ep: int) -> None:
    topo = RankTopology(world, tp, pp)
    blocks, replicas = topo.expert_groups(ep), topo.expert_data_groups(ep)
    for dp in topo.data_groups():
        mine = [b for b in blocks if set(b) <= set(dp)]
        same = [r for r in replicas if set(r) <= set(dp)]
        # expert-parallel blocks: consecutive ranks; expert-data-parallel groups: the ranks at
        # one position of every block (they hold the same experts)
        assert mine == [dp[i:i + ep] for i in range(0, len(dp), ep)]
        assert len(same) == ep and sorted(sum(same, [])) == sorted(dp)
        for position, group in enumerate(same):
            assert group == [block[position] for block in mine]
    with pytest.raises(ValueError, match="must divide the data-parallel size"):
        topo.expert_data_groups(3)
