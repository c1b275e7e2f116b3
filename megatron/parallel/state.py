"""Process groups of one rank, held in one explicit object.

``ParallelState`` replaces Megatron's module-level ``mpu`` globals: it is created once per
process after ``torch.distributed`` is initialized and passed to whatever needs a group. It
also implements the ``mpu`` duck-typed interface that DeepSpeed's engine and
``PipelineModule`` query (``get_data_parallel_group()`` and friends).

Naming: in the ``mpu`` methods "model parallel" means *tensor* parallel (the GPT-NeoX
convention; DeepSpeed's ZeRO optimizers use ``get_model_parallel_*`` to reduce gradient norms
over the ranks that shard the same parameters). The group of all ``tp x pp`` ranks holding one
model replica is the ``model_group`` field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron.parallel.topology import RankTopology

ProcessGroup = Any  # torch.distributed.ProcessGroup; None stands for "no communication"


def _new_groups(groups: list[list[int]], rank: int) -> tuple[ProcessGroup, tuple[int, ...]]:
    """Create every group of a family (collective: all ranks must call this in the same
    order) and return the one this rank belongs to."""
    mine: ProcessGroup = None
    mine_ranks: tuple[int, ...] = ()
    for ranks in groups:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine, mine_ranks = group, tuple(ranks)
    return mine, mine_ranks


@dataclass(frozen=True)
class ParallelState:
    """This rank's coordinates and process groups on the pipe x data x tensor grid.

    Groups are ``None`` only in :meth:`single` (one process, no ``torch.distributed``), where
    every collective in :mod:`megatron.parallel.mappings` is the identity.

    Expert parallelism (``ep_size`` > 1) cuts every data-parallel group into blocks of
    ``ep_size`` consecutive ranks (``ep_group``: they split each MoE layer's experts and
    exchange tokens all-to-all); without it ``ep_group`` is None. ``edp_group`` holds the
    data-parallel ranks with the same expert-parallel rank (the replicas of this rank's
    experts, over which their gradients are reduced); it is the data-parallel group when
    ``ep_size`` is 1.
    """

    topology: RankTopology
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: ProcessGroup = None
    dp_group: ProcessGroup = None
    pp_group: ProcessGroup = None
    model_group: ProcessGroup = None
    embedding_group: ProcessGroup = None
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    model_ranks: tuple[int, ...] = (0,)
    embedding_ranks: tuple[int, ...] = (0,)
    sequence_parallel: bool = False
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: ProcessGroup = None
    ep_ranks: tuple[int, ...] = (0,)
    edp_group: ProcessGroup = None
    edp_ranks: tuple[int, ...] = (0,)

    # ------------------------------------------------------------ construction
    @classmethod
    def single(cls) -> ParallelState:
        """One process, no ``torch.distributed``: all sizes 1, all ranks 0, no groups."""
        return cls(
            topology=RankTopology(1, 1, 1),
            rank=0,
            tp_size=1,
            tp_rank=0,
            pp_size=1,
            pp_rank=0,
            dp_size=1,
            dp_rank=0,
        )

    @classmethod
    def initialize(
        cls, topology: RankTopology, rank: int | None = None, *, sequence_parallel: bool = False,
        expert_parallel: int = 1,
    ) -> ParallelState:
        """Create all process groups of ``topology``; a collective call on every rank.

        Every rank calls ``torch.distributed.new_group`` for every group of every family, in
        the same order (tensor, data, pipe, model, embedding), as torch requires.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ParallelState.initialize needs torch.distributed to be initialized")
        world = dist.get_world_size()
        if world != topology.world_size:
            raise ValueError(
                f"topology is for {topology.world_size} ranks but torch.distributed has {world}"
            )
        if rank is None:
            rank = dist.get_rank()
        elif rank != dist.get_rank():
            raise ValueError(f"rank {rank} differs from torch.distributed rank {dist.get_rank()}")
        if sequence_parallel and topology.tensor_parallel == 1:
            sequence_parallel = False  # nothing to split the sequence over

        pp_rank, dp_rank, tp_rank = topology.coords(rank)
        tp_group, tp_ranks = _new_groups(topology.tensor_groups(), rank)
        dp_group, dp_ranks = _new_groups(topology.data_groups(), rank)
        pp_group, pp_ranks = _new_groups(topology.pipe_groups(), rank)
        model_group, model_ranks = _new_groups(topology.model_groups(), rank)
        embedding_group, embedding_ranks = _new_groups(topology.embedding_groups(), rank)
        if expert_parallel > 1:  # expert-parallel groups carved out of the data-parallel ones
            ep_group, ep_ranks = _new_groups(topology.expert_groups(expert_parallel), rank)
            edp_group, edp_ranks = _new_groups(topology.expert_data_groups(expert_parallel),
                                               rank)
        else:
            ep_group, ep_ranks = None, (rank,)
            edp_group, edp_ranks = dp_group, dp_ranks
        return cls(
            topology=topology,
            rank=rank,
            tp_size=topology.tensor_parallel,
            tp_rank=tp_rank,
            pp_size=topology.pipe_parallel,
            pp_rank=pp_rank,
            dp_size=topology.data_parallel,
            dp_rank=dp_rank,
            tp_group=tp_group,
            dp_group=dp_group,
            pp_group=pp_group,
            model_group=model_group,
            embedding_group=embedding_group,
            tp_ranks=tp_ranks,
            dp_ranks=dp_ranks,
            pp_ranks=pp_ranks,
            model_ranks=model_ranks,
            embedding_ranks=embedding_ranks,
            sequence_parallel=sequence_parallel,
            ep_size=expert_parallel,
            ep_rank=ep_ranks.index(rank),
            ep_group=ep_group,
            ep_ranks=ep_ranks,
            edp_group=edp_group,
            edp_ranks=edp_ranks,
        )

    def with_sequence_parallel(self, enabled: bool) -> ParallelState:
        """A copy sharing the same groups with ``sequence_parallel`` switched."""
        return dataclasses.replace(self, sequence_parallel=enabled and self.tp_size > 1)

    # ----------------------------------------------------------------- helpers
    @property
    def is_single(self) -> bool:
        """True for the state of :meth:`single` (no process groups at all)."""
        return self.tp_group is None and self.topology.world_size == 1

    def is_pipeline_first_stage(self) -> bool:
        return self.pp_rank == 0

    def is_pipeline_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def in_embedding_group(self) -> bool:
        """True on the first and last pipeline stage (holders of the tied embedding)."""
        return self.is_pipeline_first_stage() or self.is_pipeline_last_stage()

    def deepspeed_topology(self) -> Any:
        """DeepSpeed's ``PipeModelDataParallelTopology`` for ``PipelineModule(topology=...)``."""
        return self.topology.to_deepspeed()

    get_topology = deepspeed_topology

    # -------------------------------------------- mpu interface used by DeepSpeed
    def get_global_rank(self) -> int:
        return self.rank

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's group."""
        return self.tp_ranks[0]

    def get_slice_parallel_rank(self) -> int:
        return self.tp_rank

    def get_slice_parallel_world_size(self) -> int:
        return self.tp_size

    def get_slice_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipe_parallel_group(self) -> ProcessGroup:
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.pp_group

    def get_embedding_group(self) -> ProcessGroup:
        return self.embedding_group
