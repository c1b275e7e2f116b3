"""Input embedding (tokens + absolute positions) and the language-model head.

:class:`Embedding` turns ``tokens [b, s]`` into ``[s, b, h]`` activations: vocab-parallel token
embeddings over the padded vocabulary, plus learned (``pos_emb: learned``, ids shifted by
``opt_pos_emb_offset``) or sinusoidal position encodings, transposed to sequence-first, split
along the sequence with sequence parallelism, then ``hidden_dropout``.

The head turns ``[s, b, h]`` into logits ``[b, s, V / tp]``, sharded on the vocabulary: with
tied weights :func:`tied_output` multiplies by the word embedding, otherwise
:class:`OutputLayer` holds its own weight. ``Embedding(word_only=True)`` holds the word
embeddings alone (the pipeline's tied output copy on the last stage).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs
from megatron.model.init_methods import InitFn
from megatron.model.layout import Activations
from megatron.model.positional import sinusoidal_embedding
from megatron.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    master_weight,
    set_tensor_parallel_attributes,
)
from megatron.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState


class Embedding(nn.Module):
    def __init__(
        self,
        model: ModelArgs,
        *,
        padded_vocab_size: int,
        state: ParallelState,
        tracker: RNGStatesTracker | None,
        sequence_parallel: bool,
        init_method: InitFn,
        word_only: bool = False,
    ) -> None:
        super().__init__()
        assert model.hidden_size is not None
        self.hidden_size = model.hidden_size
        self.pos_emb = model.pos_emb
        self.position_offset = model.opt_pos_emb_offset
        self.dropout_p = model.hidden_dropout
        self.sequence_parallel = sequence_parallel
        self.tp_group = state.tp_group
        self.tracker = tracker
        self.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size, model.hidden_size, state=state, init_method=init_method
        )
        if model.pos_emb == "learned" and not word_only:
            assert model.max_position_embeddings is not None
            rows = model.max_position_embeddings + model.opt_pos_emb_offset
            weight = master_weight((rows, model.hidden_size), init_method)
            self.position_embeddings: nn.Embedding | None = nn.Embedding(
                rows, model.hidden_size, _weight=weight
            )
            set_tensor_parallel_attributes(self.position_embeddings.weight, False)
        else:
            self.position_embeddings = None

    def forward(self, act: Activations) -> Activations:
        """Token ids -> hidden states."""
        return act.with_x(self.embed(act.x, act.inputs.position_ids))

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``tokens, position_ids [b, s]`` -> ``[s, b, h]`` (``[s / tp, b, h]`` with sequence
        parallelism)."""
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids + self.position_offset)
        elif self.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.hidden_size).to(x.dtype)
        x = x.transpose(0, 1).contiguous()
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.tp_group)
            if self.tracker is not None and self.training and self.dropout_p > 0:
                with self.tracker.fork():
                    return F.dropout(x, p=self.dropout_p, training=True)
        return F.dropout(x, p=self.dropout_p, training=self.training)


def parallel_logits(
    x: torch.Tensor, weight: torch.Tensor, tp_group: Any, *, sequence_parallel: bool
) -> torch.Tensor:
    """``x [s, b, h]`` (sequence-split with ``sequence_parallel``) times this rank's vocabulary
    rows ``weight [V / tp, h]``: logits ``[s, b, V / tp]``."""
    if sequence_parallel:
        x = gather_from_sequence_parallel_region(x, tp_group)
    else:
        x = copy_to_tp_region(x, tp_group)
    return F.linear(x, weight)


def tied_output(embedding: Embedding, act: Activations) -> Activations:
    """The output layer tied to the word embedding: hidden ``[s, b, h]`` -> logits
    ``[b, s, V / tp]``."""
    logits = parallel_logits(act.x, embedding.word_embeddings.weight, embedding.tp_group,
                             sequence_parallel=embedding.sequence_parallel)
    return act.with_x(logits.transpose(0, 1))


class OutputLayer(ColumnParallelLinear):
    """The untied output layer: hidden ``[s, b, h]`` -> logits ``[b, s, V / tp]``."""

    def forward(self, act: Activations) -> Activations:  # type: ignore[override]
        return act.with_x(super().forward(act.x).transpose(0, 1))
