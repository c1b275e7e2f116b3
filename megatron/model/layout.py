"""The model as a sequence of blocks, and what flows from one block to the next.

:func:`pipeline_layout` lists the blocks in order (embedding, T5 bias table, transformer
layers, final norm, output layer); :class:`~megatron.model.gpt.GPTModel` runs them in this
order and :class:`~megatron.model.pipeline.GPTPipelineModule` cuts the same list into stages.
Every block takes and returns one :class:`Activations`, so a block runs unchanged in both forms.

With ``init_seed`` set, block ``i`` is initialized right after ``torch.manual_seed(init_seed +
i)``, in the plain model and in the pipeline module alike, so the initial weights do not depend
on how the layers are split over pipeline stages (nor, thanks to the tensor-parallel
master-weight init, over tensor-parallel ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron.model.args import ModelArgs

if TYPE_CHECKING:
    from megatron.model.attention import AttentionInputs
    from megatron.model.gpt import KVCache


@dataclass(frozen=True)
class Activations:
    """What one block hands the next.

    ``x`` is the tensor being transformed: token ids ``[b, s]`` before the embedding, hidden
    states ``[s, b, h]`` (``[s / tp, b, h]`` with sequence parallelism) between the blocks,
    logits ``[b, s, V / tp]`` after the output layer. ``inputs`` holds what every attention
    layer reads (positions, mask, T5 bias, first position); ``kv_cache`` is set when decoding.
    Blocks return a new object and never modify theirs: a checkpointed chunk of blocks runs
    twice on the same input.
    """

    x: torch.Tensor
    inputs: AttentionInputs
    kv_cache: KVCache | None = None

    def with_x(self, x: torch.Tensor) -> Activations:
        return dataclasses.replace(self, x=x)


#: How a block acts in the sequence: ``Activations -> Activations``.
Step = Callable[[Activations], Activations]


@dataclass(frozen=True)
class PipeEntry:
    """One block: ``kind`` in embed | rpe | layer | final_norm | output."""

    kind: str
    layer: int = -1  # depth of a transformer layer
    tied: bool = False


def pipeline_layout(model: ModelArgs) -> list[PipeEntry]:
    """The blocks in order (the pipeline module's layer specs)."""
    assert model.num_layers is not None
    tied = not model.no_weight_tying
    entries = [PipeEntry("embed", tied=tied)]
    for depth in range(model.num_layers):
        if model.pos_emb == "rpe":
            entries.append(PipeEntry("rpe", tied=True))
        entries.append(PipeEntry("layer", depth))
    entries += [PipeEntry("final_norm"), PipeEntry("output", tied=tied)]
    return entries


def first_index(model: ModelArgs, kind: str, layer: int = -1) -> int:
    """Index of the first block of ``kind`` (and depth ``layer`` for transformer layers)."""
    for i, entry in enumerate(pipeline_layout(model)):
        if entry.kind == kind and (layer < 0 or entry.layer == layer):
            return i
    raise KeyError(kind)


@contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Build a block under ``torch.manual_seed(seed)`` (no-op when ``seed`` is None)."""
    if seed is not None:
        torch.manual_seed(seed)
    yield


@contextmanager
def preserved_rng(enabled: bool) -> Iterator[None]:
    """Leave the torch RNG as it was: model construction must not shift later randomness."""
    saved = torch.get_rng_state() if enabled else None
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved)
