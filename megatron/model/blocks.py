"""Running the model's blocks in layout order: shared by the plain model and the pipeline.

Every entry of :func:`~megatron.model.layout.pipeline_layout` becomes one *step*, an
``Activations -> Activations`` function (:func:`block_step`). The embedding, the transformer
layers and the untied output layer are blocks themselves (their ``forward`` takes and returns
:class:`~megatron.model.layout.Activations`); the T5 bias table, the final norm and the tied
output layer keep their plain tensor interface and run through :func:`add_position_bias`,
:func:`normalize` and :func:`~megatron.model.embedding.tied_output`.

:class:`~megatron.model.gpt.GPTModel` runs all steps; a pipeline stage runs its slice of them.
Both go through :func:`run_blocks`, which also applies activation checkpointing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

from torch import nn

from megatron.model.embedding import Embedding, tied_output
from megatron.model.layout import Activations, PipeEntry, Step
from megatron.model.positional import RelativePositionBias
from megatron.parallel.random import RNGStatesTracker, checkpoint


def add_position_bias(rpe: RelativePositionBias, act: Activations) -> Activations:
    """Compute the T5 bias of this forward pass for the attention layers that follow."""
    inputs = act.inputs
    q_len = inputs.position_ids.shape[1]
    bias = rpe(q_len, inputs.start_pos + q_len, inputs.start_pos)
    return dataclasses.replace(act, inputs=dataclasses.replace(inputs, position_bias=bias))


def normalize(norm: nn.Module, act: Activations) -> Activations:
    """Apply a norm (a plain tensor module) to the hidden states."""
    return act.with_x(norm(act.x))


def block_step(entry: PipeEntry, block: nn.Module) -> Step:
    """How ``block``, built for layout entry ``entry``, acts in the sequence."""
    if entry.kind == "rpe":
        assert isinstance(block, RelativePositionBias)
        return partial(add_position_bias, block)
    if entry.kind == "final_norm":
        return partial(normalize, block)
    if entry.kind == "output" and entry.tied:
        assert isinstance(block, Embedding)
        return partial(tied_output, block)
    return block


def run_blocks(
    steps: Sequence[tuple[PipeEntry, Step]],
    act: Activations,
    *,
    checkpoint_layers: int = 0,
    tracker: RNGStatesTracker | None = None,
) -> Activations:
    """Run ``steps`` in order.

    With ``checkpoint_layers > 0`` every run of that many consecutive transformer layers
    (together with the T5 bias steps in front of them) is checkpointed: its activations are
    recomputed in backward instead of kept, replaying the tracker's dropout streams.
    """
    if checkpoint_layers <= 0:
        for _, step in steps:
            act = step(act)
        return act

    def run_chunk(chunk: list[Step], act: Activations) -> Activations:
        for step in chunk:
            act = step(act)
        return act

    chunk: list[Step] = []
    layers = 0
    for entry, step in steps:
        if entry.kind not in ("rpe", "layer"):
            if chunk:
                act = checkpoint(run_chunk, tracker, chunk, act)
                chunk, layers = [], 0
            act = step(act)
            continue
        chunk.append(step)
        if entry.kind == "layer":
            layers += 1
            if layers == checkpoint_layers:
                act = checkpoint(run_chunk, tracker, chunk, act)
                chunk, layers = [], 0
    if chunk:
        act = checkpoint(run_chunk, tracker, chunk, act)
    return act
