"""Tensor-parallel resharding of ``GPTModel`` state dicts: merge shards, split full tensors.

How a parameter splits is recorded once, on the layer that owns it: every parameter carries
``partition_dim`` / ``partition_stride`` (:func:`~megatron.parallel.layers.
set_tensor_parallel_attributes`; -1 for replicated parameters such as norms and row-parallel
biases). :func:`split_rules` builds the ``GPTModel`` of a :class:`ModelArgs` at tensor parallel
1 on the ``meta`` device (no weights allocated, no random numbers drawn) and reads those
attributes into a table ``{state-dict name: Partition}``. Buffers in the state dict (the rotary
``inv_freq`` with ``rotary_save_freqs_buffer``) are replicated; names the model does not have
are treated as replicated, and callers compare the result with the model
(:func:`megatron.checkpoint.weights.check_against_model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megatron.checkpoint.manifest import CheckpointError
from megatron.model.args import ModelArgs
from megatron.model.gpt import GPTModel
from megatron.neox_arguments.groups_model import ActivationCheckpointArgs
from megatron.parallel.layers import merge_shards, split_tensor
from megatron.parallel.state import ParallelState

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Partition:
    """How a parameter is split over tensor-parallel ranks (``dim`` None: replicated)."""

    dim: int | None
    stride: int = 1


REPLICATED = Partition(None)
SplitRules = dict[str, Partition]


def split_rules(model: ModelArgs) -> SplitRules:
    """The split of every ``GPTModel`` state-dict entry for ``model``, read from the layers."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        net = GPTModel(model, ActivationCheckpointArgs(), padded_vocab_size=1,
                       state=ParallelState.single())
    rules: SplitRules = {}
    for name, value in net.state_dict(keep_vars=True).items():
        if not isinstance(value, nn.Parameter):
            rules[name] = REPLICATED
            continue
        dim = getattr(value, "partition_dim", None)
        if dim is None:
            raise TypeError(f"GPTModel parameter {name} has no partition_dim: its layer must "
                            "call megatron.parallel.layers.set_tensor_parallel_attributes")
        rules[name] = Partition(dim, value.partition_stride) if dim >= 0 else REPLICATED
    return rules


def partition_of(name: str, model: ModelArgs, rules: SplitRules | None = None) -> Partition:
    """The tensor-parallel split of ``GPTModel`` entry ``name`` (replicated when the model has
    no such entry). Pass ``rules`` from :func:`split_rules` when looking up many names."""
    return (rules if rules is not None else split_rules(model)).get(name, REPLICATED)


def merge_tp_shards(shards: Sequence[Mapping[str, torch.Tensor]], model: ModelArgs) -> StateDict:
    """Full tensors from every tensor-parallel rank's state dict (in rank order)."""
    if not shards:
        raise ValueError("no shards to merge")
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            odd = sorted(set(shard) ^ set(names))[:3]
            raise CheckpointError(f"tensor-parallel rank {rank} has different entries than rank "
                                  f"0: {odd}")
    if len(shards) == 1:
        return dict(shards[0])
    rules = split_rules(model)
    full: StateDict = {}
    for name in names:
        part = partition_of(name, model, rules)
        if part.dim is None:
            full[name] = shards[0][name]
        else:
            full[name] = merge_shards([s[name] for s in shards], part.dim, part.stride)
    return full


def shard_state_dict(full: Mapping[str, torch.Tensor], model: ModelArgs, tp_size: int,
                     tp_rank: int, rules: SplitRules | None = None) -> StateDict:
    """Tensor-parallel rank ``tp_rank``'s part of a full state dict."""
    if tp_size == 1:
        return dict(full)
    rules = rules if rules is not None else split_rules(model)
    out: StateDict = {}
    for name, tensor in full.items():
        part = partition_of(name, model, rules)
        if part.dim is None:
            out[name] = tensor
        else:
            try:
                out[name] = split_tensor(tensor, part.dim, tp_size, tp_rank, part.stride)
            except ValueError as exc:
                raise CheckpointError(f"{name}: cannot split {list(tensor.shape)} over tensor "
                                      f"parallel {tp_size} ({exc})") from None
    return out


def split_tp(full: Mapping[str, torch.Tensor], model: ModelArgs, tp_size: int) -> list[StateDict]:
    """Every tensor-parallel rank's state dict, in rank order."""
    rules = split_rules(model) if tp_size > 1 else None
    return [shard_state_dict(full, model, tp_size, r, rules) for r in range(tp_size)]
