"""The model as a sequence of blocks: the pipeline's layer-spec order, shared by both forms.

Each block (embedding, T5 bias table, transformer layer, final norm, output layer) has an index
in this sequence. With ``init_seed`` set, block ``i`` is initialized right after
``torch.manual_seed(init_seed + i)``, in the plain model and in the pipeline module alike, so
the initial weights do not depend on how the layers are split over pipeline stages (nor, thanks
to the tensor-parallel master-weight init, over tensor-parallel ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron.neox_arguments.groups_model import ModelArgs


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
