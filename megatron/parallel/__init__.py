"""Model-parallel primitives: rank topology, process groups, tensor-parallel layers,
communication mappings, vocab-parallel cross entropy and the RNG tracker.

See ``docs/parallelism.md`` for how the pieces fit together.
"""

from __future__ import annotations

from megatron.parallel.activation_checkpointing import checkpoint
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_tensor,
    is_tensor_parallel,
    merge_shards,
    param_is_not_tp_duplicate,
    register_sequence_parallel_grad_hooks,
    shard_tensor,
    split_tensor,
)
from megatron.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    model_parallel_seed,
)
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology

__all__ = [
    "MODEL_PARALLEL_RNG",
    "ColumnParallelLinear",
    "ParallelState",
    "RNGStatesTracker",
    "RankTopology",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "checkpoint",
    "copy_to_tp_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tp_region",
    "gather_tensor",
    "is_tensor_parallel",
    "merge_shards",
    "model_parallel_seed",
    "param_is_not_tp_duplicate",
    "reduce_from_tp_region",
    "register_sequence_parallel_grad_hooks",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tp_region",
    "shard_tensor",
    "split_tensor",
    "vocab_parallel_cross_entropy",
]
