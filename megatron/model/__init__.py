"""The GPT model: a decoder-only transformer over tensor- and pipeline-parallel ranks.

Public API (details in ``docs/model.md``)::

    GPTModel(model: ModelArgs, act_ckpt: ActivationCheckpointArgs, *, padded_vocab_size: int,
             state: ParallelState, tracker: RNGStatesTracker | None = None,
             sequence_parallel: bool | None = None)
        .forward(tokens, position_ids=None, attention_mask=None, *, kv_cache=None)
            -> logits [b, s, padded_vocab / tp]  (this rank's vocabulary shard)
        .new_kv_cache(batch_size, max_length=None, *, dtype=None, device=None) -> KVCache

    lm_loss(logits, labels, loss_mask, state, fp32=True) -> scalar mean loss
    gather_logits(logits, state) -> [b, s, padded_vocab]

    build_model(model, act_ckpt, parallelism, *, padded_vocab_size, state, tracker, loss_fn=None)
        -> GPTModel (pipe_parallel_size 0) | GPTPipelineModule (pipe_parallel_size >= 1)
    build_pipeline_model(model, act_ckpt, parallelism, *, padded_vocab_size, state, tracker,
                         loss_fn=None, sequence_parallel=None) -> GPTPipelineModule
    pipeline_to_model_state_dict(state_dict, model) / model_to_pipeline_state_dict(...)
    pipeline_key_to_model_key(key, model)
    load_model_state_dict_into_pipeline(pipe, state_dict, model)
    partition_pipeline_layers(specs, method, num_stages) -> stage boundaries

With sequence parallelism both forms register
``megatron.parallel.register_sequence_parallel_grad_hooks`` on themselves: backward sums the
partial gradients of the sequence-parallel parameters over the tensor-parallel group.

Modules: :mod:`~megatron.model.args` (``ModelArgs``, attention types, MLP width; free of torch
so the config schema can import it), :mod:`~megatron.model.gpt` (model, loss, KV cache),
:mod:`~megatron.model.layout` (the block order and the ``Activations`` passed between blocks),
:mod:`~megatron.model.blocks` (running blocks in order, shared by both forms),
:mod:`~megatron.model.pipeline`, :mod:`~megatron.model.transformer` (layer and residual forms),
:mod:`~megatron.model.attention`, :mod:`~megatron.model.mlp`, :mod:`~megatron.model.embedding`,
:mod:`~megatron.model.positional`, :mod:`~megatron.model.norms`,
:mod:`~megatron.model.activations`, :mod:`~megatron.model.init_methods`.

The names below load on first use, so ``import megatron.model.args`` stays cheap (no torch
model code, no DeepSpeed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.model.factory import build_model
    from megatron.model.gpt import GPTModel, KVCache, gather_logits, lm_loss
    from megatron.model.pipeline import (
        GPTPipelineModule,
        PipelineLMLoss,
        build_pipeline_model,
        load_model_state_dict_into_pipeline,
        model_to_pipeline_state_dict,
        partition_pipeline_layers,
        pipeline_key_to_model_key,
        pipeline_layer_specs,
        pipeline_to_model_state_dict,
    )

_HOMES = {
    "build_model": "factory",
    **dict.fromkeys(("GPTModel", "KVCache", "gather_logits", "lm_loss"), "gpt"),
    **dict.fromkeys((
        "GPTPipelineModule", "PipelineLMLoss", "build_pipeline_model",
        "load_model_state_dict_into_pipeline", "model_to_pipeline_state_dict",
        "partition_pipeline_layers", "pipeline_key_to_model_key", "pipeline_layer_specs",
        "pipeline_to_model_state_dict",
    ), "pipeline"),
}  # fmt: skip

__all__ = [
    "GPTModel",
    "GPTPipelineModule",
    "KVCache",
    "PipelineLMLoss",
    "build_model",
    "build_pipeline_model",
    "gather_logits",
    "lm_loss",
    "load_model_state_dict_into_pipeline",
    "model_to_pipeline_state_dict",
    "partition_pipeline_layers",
    "pipeline_key_to_model_key",
    "pipeline_layer_specs",
    "pipeline_to_model_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
