"""Placement of global ranks on the pipeline x data x tensor grid.

Pure bookkeeping: nothing here touches ``torch.distributed``. The layout matches DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``pipe``, ``data``, ``model``, row-major, so the
tensor-parallel coordinate varies fastest)::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Tensor-parallel peers therefore hold consecutive ranks (on one node when ``tp`` divides the
number of GPUs per node), data-parallel peers are ``tp`` apart and pipeline stages are
``dp * tp`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Groups = list[list[int]]


@dataclass(frozen=True)
class RankTopology:
    """A ``world_size`` job split into ``pipe_parallel`` stages of ``tensor_parallel`` shards.

    The data-parallel degree is derived: ``world_size // (tensor_parallel * pipe_parallel)``.
    """

    world_size: int
    tensor_parallel: int = 1
    pipe_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tensor_parallel", "pipe_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model = self.tensor_parallel * self.pipe_parallel
        if self.world_size % model != 0:
            raise ValueError(
                f"world_size {self.world_size} is not divisible by tensor_parallel "
                f"{self.tensor_parallel} x pipe_parallel {self.pipe_parallel} = {model}"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipe_parallel)

    @property
    def model_parallel(self) -> int:
        """Ranks holding one full copy of the model: ``tensor_parallel * pipe_parallel``."""
        return self.tensor_parallel * self.pipe_parallel

    # ------------------------------------------------------------ coordinates
    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(pp_rank, dp_rank, tp_rank)`` of a global rank."""
        self._check_rank(rank)
        tp = self.tensor_parallel
        per_stage = self.data_parallel * tp
        pp_rank, rest = divmod(rank, per_stage)
        dp_rank, tp_rank = divmod(rest, tp)
        return pp_rank, dp_rank, tp_rank

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """Global rank at pipeline stage ``pp``, data-parallel replica ``dp``, shard ``tp``."""
        for name, value, size in (
            ("pp", pp, self.pipe_parallel),
            ("dp", dp, self.data_parallel),
            ("tp", tp, self.tensor_parallel),
        ):
            if not 0 <= value < size:
                raise ValueError(f"{name} coordinate {value} out of range [0, {size})")
        return (pp * self.data_parallel + dp) * self.tensor_parallel + tp

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")

    # ----------------------------------------------------------------- groups
    # Each family is listed in the same order as DeepSpeed's ``get_axis_comm_lists`` (the
    # other axes enumerated row-major, the group's own axis innermost), so building process
    # groups in list order matches DeepSpeed's own grid.
    def tensor_groups(self) -> Groups:
        """Ranks that shard the same layers (same stage, same replica)."""
        return [
            [self.rank(p, d, t) for t in range(self.tensor_parallel)]
            for p in range(self.pipe_parallel)
            for d in range(self.data_parallel)
        ]

    def data_groups(self) -> Groups:
        """Ranks that hold identical parameters and average gradients."""
        return [
            [self.rank(p, d, t) for d in range(self.data_parallel)]
            for p in range(self.pipe_parallel)
            for t in range(self.tensor_parallel)
        ]

    def pipe_groups(self) -> Groups:
        """Ranks forming one pipeline (stage 0 first)."""
        return [
            [self.rank(p, d, t) for p in range(self.pipe_parallel)]
            for d in range(self.data_parallel)
            for t in range(self.tensor_parallel)
        ]

    def model_groups(self) -> Groups:
        """The ``tp * pp`` ranks that together hold one replica of the model."""
        return [
            [
                self.rank(p, d, t)
                for p in range(self.pipe_parallel)
                for t in range(self.tensor_parallel)
            ]
            for d in range(self.data_parallel)
        ]

    def embedding_groups(self) -> Groups:
        """First and last stage of each pipeline (they hold the tied input/output embedding).

        With one stage the group is that single rank; ranks of middle stages belong to none.
        """
        groups = []
        for pipe in self.pipe_groups():
            groups.append([pipe[0]] if len(pipe) == 1 else [pipe[0], pipe[-1]])
        return groups

    def expert_groups(self, expert_parallel: int) -> Groups:
        """Expert-parallel groups: each data-parallel group cut into consecutive blocks of
        ``expert_parallel`` ranks (they split the experts and exchange tokens)."""
        self._check_expert_parallel(expert_parallel)
        return [dp[i:i + expert_parallel] for dp in self.data_groups()
                for i in range(0, len(dp), expert_parallel)]

    def expert_data_groups(self, expert_parallel: int) -> Groups:
        """Expert-data-parallel groups: the data-parallel ranks holding the same experts (the
        same position in their expert-parallel blocks); expert gradients are reduced over
        them."""
        self._check_expert_parallel(expert_parallel)
        return [dp[i::expert_parallel] for dp in self.data_groups()
                for i in range(expert_parallel)]

    def _check_expert_parallel(self, expert_parallel: int) -> None:
        if expert_parallel < 1 or self.data_parallel % expert_parallel:
            raise ValueError(f"expert_model_parallel_size {expert_parallel} must divide the "
                             f"data-parallel size {self.data_parallel}")

    def group_of(self, groups: Groups, rank: int) -> list[int] | None:
        """The group of ``groups`` containing ``rank`` (None if it is in none of them)."""
        self._check_rank(rank)
        for group in groups:
            if rank in group:
                return group
        return None

    # -------------------------------------------------------------- deepspeed
    def to_deepspeed(self) -> Any:
        """The equivalent ``deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology``."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(
            num_pp=self.pipe_parallel, num_mp=self.tensor_parallel, num_dp=self.data_parallel
        )

    def __str__(self) -> str:
        return (
            f"RankTopology(world={self.world_size}, pp={self.pipe_parallel}, "
            f"dp={self.data_parallel}, tp={self.tensor_parallel})"
        )
