"""The model's blocks in layout order: what to build for each, and how to run them. Shared by
the plain model and the pipeline.

:func:`block_specs` gives, for every entry of the layout, the block class and its arguments:
:class:`~megatron.model.gpt.GPTModel` builds them directly, the pipeline wraps them in
DeepSpeed layer specs.

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
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from megatron.model.args import ModelArgs, attention_layer_types
from megatron.model.embedding import Embedding, OutputLayer, tied_output
from megatron.model.gmlp import GMLPLayer
from megatron.model.init_methods import model_init_methods
from megatron.model.layout import Activations, PipeEntry, Step, pipeline_layout
from megatron.model.mamba import MambaLayer
from megatron.model.norms import norm_spec
from megatron.model.positional import RelativePositionBias, RotaryEmbedding
from megatron.model.rwkv import RWKVLayer
from megatron.model.transformer import TransformerLayer
from megatron.parallel.activation_checkpointing import (
    ActivationCheckpointing,
    checkpoint,
    ensure_configured,
)
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

# ----------------------------------------------------------------------------- build
#: The blocks of the layer types without attention, by ``attention_config`` type.
MIXER_LAYERS: dict[str, type[nn.Module]] = {
    "mamba": MambaLayer, "rwkv": RWKVLayer, "gmlp": GMLPLayer, "amlp": GMLPLayer,
}
MIXER_LAYER_CLASSES = (MambaLayer, RWKVLayer, GMLPLayer)


def mixer_layer_class(kind: str) -> type[nn.Module] | None:
    """The block of a layer type without attention (``mamba``, ``rwkv``, ``gmlp``, ``amlp``);
    None for the attention types (a :class:`TransformerLayer`)."""
    return MIXER_LAYERS.get(kind)


def rotary_embedding(model: ModelArgs) -> RotaryEmbedding | None:
    """The shared rotary tables of a ``pos_emb: rotary`` model (None otherwise)."""
    if model.pos_emb != "rotary":
        return None
    assert model.hidden_size and model.num_attention_heads and model.max_position_embeddings
    head_dim = model.hidden_size // model.num_attention_heads
    return RotaryEmbedding(
        int(head_dim * model.rotary_pct), base=model.rotary_emb_base,
        max_positions=model.max_position_embeddings,
        save_inv_freq=model.rotary_save_freqs_buffer,
    )  # fmt: skip


@dataclass(frozen=True)
class BlockSpec:
    """The block of one layout entry: ``cls(**kwargs)``."""

    entry: PipeEntry
    cls: type[nn.Module]
    kwargs: dict[str, Any]

    def build(self) -> nn.Module:
        return self.cls(**self.kwargs)


def block_specs(
    model: ModelArgs,
    *,
    padded_vocab_size: int,
    state: ParallelState,
    tracker: RNGStatesTracker | None,
    sequence_parallel: bool,
) -> list[BlockSpec]:
    """Class and arguments of the block of every layout entry, in layout order. The layers
    share one rotary table; the tied output entry is a word-only :class:`Embedding` (the
    plain model uses its embedding instead, the pipeline's last stage builds this copy)."""
    assert model.num_layers is not None and model.hidden_size is not None
    init, output_init = model_init_methods(model)
    rotary = rotary_embedding(model)
    kinds = attention_layer_types(model.attention_config, model.num_layers)
    sp = sequence_parallel
    common = {"state": state, "tracker": tracker, "sequence_parallel": sp}
    embedding = {"model": model, "padded_vocab_size": padded_vocab_size, "init_method": init,
                 **common}

    def spec(entry: PipeEntry) -> BlockSpec:
        assert model.hidden_size is not None
        if entry.kind == "embed":
            return BlockSpec(entry, Embedding, embedding)
        if entry.kind == "rpe":
            return BlockSpec(entry, RelativePositionBias, {
                "num_buckets": model.rpe_num_buckets, "max_distance": model.rpe_max_distance,
                "num_heads": model.num_attention_heads, "state": state, "init_method": init,
            })  # fmt: skip
        if entry.kind == "layer":
            layer_cls = mixer_layer_class(kinds[entry.layer])
            if layer_cls is not None:
                return BlockSpec(entry, layer_cls, {
                    "model": model, "layer_number": entry.layer + 1,
                    "attention_type": kinds[entry.layer], "init_method": init,
                    "output_init_method": output_init, **common,
                })  # fmt: skip
            return BlockSpec(entry, TransformerLayer, {
                "model": model, "layer_number": entry.layer + 1,
                "attention_type": kinds[entry.layer], "init_method": init,
                "output_init_method": output_init, "rotary": rotary, **common,
            })  # fmt: skip
        if entry.kind == "final_norm":
            norm, kwargs = norm_spec(model, model.hidden_size, sequence_parallel=sp)
            return BlockSpec(entry, norm, kwargs)
        if entry.tied:
            return BlockSpec(entry, Embedding, {**embedding, "word_only": True})
        return BlockSpec(entry, OutputLayer, {
            "in_features": model.hidden_size, "out_features": padded_vocab_size, "state": state,
            "bias": False, "init_method": init, "sequence_parallel_input": sp,
        })  # fmt: skip

    return [spec(entry) for entry in pipeline_layout(model)]


# ------------------------------------------------------------------------------- run


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
    tracker: RNGStatesTracker | None = None,
    checkpointing: ActivationCheckpointing | None = None,
) -> Activations:
    """Run ``steps`` in order.

    With ``checkpointing`` (``layers > 0``) every run of that many consecutive transformer
    layers (together with the T5 bias steps in front of them) is checkpointed through
    DeepSpeed (:mod:`megatron.parallel.activation_checkpointing`): only the chunk's inputs are
    kept, and its activations are recomputed in backward, replaying the tracker's dropout
    streams.
    """
    if checkpointing is None or checkpointing.layers <= 0:
        for _, step in steps:
            act = step(act)
        return act
    ensure_configured(checkpointing.settings, checkpointing.state or ParallelState.single())

    chunk: list[Step] = []
    layers = 0
    for entry, step in steps:
        if entry.kind not in ("rpe", "layer"):
            if chunk:
                act = checkpoint_chunk(chunk, act, tracker)
                chunk, layers = [], 0
            act = step(act)
            continue
        chunk.append(step)
        if entry.kind == "layer":
            layers += 1
            if layers == checkpointing.layers:
                act = checkpoint_chunk(chunk, act, tracker)
                chunk, layers = [], 0
    if chunk:
        act = checkpoint_chunk(chunk, act, tracker)
    return act


def checkpoint_chunk(chunk: Sequence[Step], act: Activations,
                     tracker: RNGStatesTracker | None) -> Activations:
    """Run ``chunk`` checkpointed. DeepSpeed sees the tensors of ``act`` (hidden states,
    positions, and the mask and T5 bias where set); the chunk hands on its hidden states (the T5
    bias is recomputed by the bias step in front of every layer)."""
    inputs = act.inputs
    optional = {"attention_mask": inputs.attention_mask, "position_bias": inputs.position_bias}
    present = [name for name, value in optional.items() if value is not None]

    def run(x: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        fields = {"position_ids": position_ids, **dict(zip(present, rest))}
        out = Activations(x, dataclasses.replace(inputs, **fields), act.kv_cache)
        for step in chunk:
            out = step(out)
        return out.x

    x = checkpoint(run, tracker, act.x, inputs.position_ids, *(optional[n] for n in present))
    return act.with_x(x)
