"""One entry point for the trainer: the plain model or the pipeline module, by config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from megatron.model.args import ModelArgs
from megatron.model.gpt import GPTModel
from megatron.model.pipeline import GPTPipelineModule, build_pipeline_model
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_model import ActivationCheckpointArgs, ParallelismArgs


def build_model(
    model: ModelArgs,
    act_ckpt: ActivationCheckpointArgs,
    parallelism: ParallelismArgs,
    *,
    padded_vocab_size: int,
    state: ParallelState,
    tracker: RNGStatesTracker | None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    init_seed: int | None = None,
) -> GPTModel | GPTPipelineModule:
    """``pipe_parallel_size: 0`` -> :class:`GPTModel`; 1 or more -> the DeepSpeed pipeline
    module (:func:`build_pipeline_model`). Sequence parallelism follows
    ``parallelism.sequence_parallel`` (effective with ``model_parallel_size > 1``).
    ``init_seed`` seeds each block so both forms start from the same weights."""
    if parallelism.pipe_parallel_size == 0:
        return GPTModel(
            model, act_ckpt, padded_vocab_size=padded_vocab_size, state=state, tracker=tracker,
            sequence_parallel=parallelism.sequence_parallel, init_seed=init_seed,
        )  # fmt: skip
    return build_pipeline_model(
        model, act_ckpt, parallelism, padded_vocab_size=padded_vocab_size, state=state,
        tracker=tracker, loss_fn=loss_fn, sequence_parallel=parallelism.sequence_parallel,
        init_seed=init_seed,
    )  # fmt: skip
