"""Tensor-parallel linear and embedding layers.

``ColumnParallelLinear`` splits the output features over the tensor-parallel group,
``RowParallelLinear`` the input features, ``VocabParallelEmbedding`` the vocabulary. With
``ParallelState.single()`` (or any state with ``tp_size == 1``) they compute exactly what
``torch.nn.functional.linear`` / ``embedding`` compute with the same weights.

Built under ``with torch.device("meta")`` the layers allocate nothing and draw no random
numbers (shapes and attributes only).

Initialization is tensor-parallel invariant: every rank builds the *full* weight (the
"master weight") in fp32 on the CPU with ``init_method`` from the current torch RNG and keeps
only its own slice. A model built with TP=2 from seed ``s`` therefore holds exactly the slices
of the TP=1 model built from seed ``s``, and every rank consumes the same random numbers, so
later layers stay in sync too. The price is memory and time at construction: each rank
briefly holds one full fp32 copy of the layer's weight (for a 50k x 8k embedding that is
1.6 GB), freed as soon as the slice is taken.

Parameters carry attributes read by checkpoint conversion, gradient-norm computation and
weight-decay grouping:

* ``tensor_model_parallel`` -- True when the parameter is a shard (False when replicated);
* ``partition_dim`` / ``partition_stride`` -- how the full tensor is split over
  tensor-parallel ranks (see :func:`split_tensor`), set whatever the tensor-parallel size;
  ``partition_dim`` -1 for a replicated parameter. Every parameter of the model carries them
  (norms and other replicated layers too): checkpoint resharding reads its split rules from
  here (:mod:`megatron.checkpoint.reshard`);
* ``sequence_parallel`` -- True for replicated parameters used on sequence-parallel
  activations, whose gradients must be summed over the tensor-parallel group
  (:func:`register_sequence_parallel_grad_hooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.parallel.mappings import (
    all_gather_dim,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], Any]


# ------------------------------------------------------------------ shard helpers
def _check_divisible(what: str, size: int, parts: int, detail: str) -> None:
    if size % parts != 0:
        raise ValueError(f"{what} {size} is not divisible by {detail} = {parts}")


def split_tensor(
    full: torch.Tensor, dim: int, world_size: int, rank: int, stride: int = 1
) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` (a new contiguous tensor).

    ``full`` is cut into ``world_size * stride`` equal chunks; rank ``r`` keeps chunks
    ``r, r + world_size, ..., r + (stride - 1) * world_size`` concatenated. With
    ``stride=2`` and ``full = [a; b]`` (``a`` and ``b`` of equal size) every rank gets
    ``[a_r; b_r]``: matching halves of both parts, as a fused up/gate projection needs.
    """
    parts = world_size * stride
    _check_divisible(
        f"dimension {dim} of size", full.shape[dim], parts, f"tp {world_size} x stride {stride}"
    )
    if full.is_meta:  # the shard's shape only
        shape = list(full.shape)
        shape[dim] //= world_size
        return full.new_empty(shape)
    chunks = full.chunk(parts, dim=dim)
    return torch.cat([chunks[rank + k * world_size] for k in range(stride)], dim=dim)


def merge_shards(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_tensor`: the full tensor from all ranks' shards, in rank order."""
    world = len(shards)
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(world)], dim=dim)


def shard_tensor(
    full: torch.Tensor, dim: int, state: ParallelState, stride: int = 1
) -> torch.Tensor:
    """This rank's tensor-parallel shard of ``full`` (for loading full weights)."""
    return split_tensor(full, dim, state.tp_size, state.tp_rank, stride)


def gather_tensor(
    shard: torch.Tensor, dim: int, state: ParallelState, stride: int = 1
) -> torch.Tensor:
    """The full tensor from every tensor-parallel rank's ``shard`` (collective; no autograd)."""
    if state.tp_size == 1:
        return shard.detach().clone()
    with torch.no_grad():
        stacked = all_gather_dim(shard.detach().unsqueeze(0), 0, state.tp_group)
    return merge_shards(list(stacked.unbind(0)), dim, stride)


def _unstride_last_dim(x: torch.Tensor, world_size: int, stride: int) -> torch.Tensor:
    """Reorder an all-gathered strided last dim back to the full tensor's order."""
    if stride == 1:
        return x
    chunk = x.shape[-1] // (world_size * stride)
    lead = x.shape[:-1]
    return x.reshape(*lead, world_size, stride, chunk).transpose(-3, -2).reshape(*lead, -1)


# ------------------------------------------------------------- param attributes
def set_tensor_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, dim: int = -1, stride: int = 1
) -> None:
    """Record how ``param`` splits: along ``dim`` (with ``stride``) when ``dim >= 0``,
    replicated when ``dim`` is -1; ``is_parallel`` says whether this copy is a shard (tensor
    parallel size above 1)."""
    param.tensor_model_parallel = is_parallel  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    param.partition_stride = stride  # type: ignore[attr-defined]


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def param_is_not_tp_duplicate(param: torch.Tensor, state: ParallelState) -> bool:
    """Whether this rank's copy of ``param`` counts in a gradient norm: shards always do,
    replicated parameters only on tensor-parallel rank 0."""
    return is_tensor_parallel(param) or state.tp_rank == 0


def register_sequence_parallel_grad_hooks(module: nn.Module, state: ParallelState) -> int:
    """Sum each sequence-parallel parameter's gradient over the tensor-parallel group as
    backward produces it (before it is accumulated into ``.grad``).

    DeepSpeed's bf16 and ZeRO optimizers consume gradients during ``backward`` (into fp32
    buffers or reduce buckets), so a reduction after backward would come too late there; a
    tensor hook runs before any of that. Returns the number of hooked parameters."""
    if state.tp_size == 1:
        return 0
    group = state.tp_group
    count = 0
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:

            def reduce(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.contiguous().clone()
                dist.all_reduce(grad, group=group)
                return grad

            p.register_hook(reduce)
            count += 1
    return count


def master_weight(shape: tuple[int, ...], init_method: InitMethod) -> torch.Tensor:
    """The full fp32 weight on the CPU filled by ``init_method`` from the current torch RNG
    (uninitialized on the ``meta`` device when that is the default device)."""
    if torch.get_default_device().type == "meta":  # shapes and attributes only
        return torch.empty(shape, dtype=torch.float32, device="meta")
    master = torch.empty(shape, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        init_method(master)
    return master


def _parameter(
    data: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None
) -> nn.Parameter:
    return nn.Parameter(data.to(device=device or data.device, dtype=dtype).contiguous())


# ---------------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split along its output (first) dim.

    Each rank computes ``out_features / tp`` output features. The output stays split on its
    last dim (``gather_output=False``, the normal case: a ``RowParallelLinear`` or the
    vocab-parallel loss follows) unless ``gather_output=True``.

    ``partition_stride`` > 1 splits the weight into ``tp * stride`` chunks and gives rank
    ``r`` chunks ``r, r+tp, ...`` (see :func:`split_tensor`); a gathered output is put back
    in the full layer's order. ``sequence_parallel_input=True`` expects the input split on
    its first (sequence) dim and all-gathers it; backward reduce-scatters the input grad.
    ``skip_bias_add=True`` returns the output without the bias; the caller adds
    :attr:`output_bias` itself (e.g. fused with the activation).

    ``linear_impl(x, weight, bias)`` computes the local product (``F.linear``); FP8 training
    replaces it per layer (:mod:`megatron.training.compile`).
    """

    linear_impl: Callable[..., torch.Tensor] = staticmethod(F.linear)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
        skip_bias_add: bool = False,
        sequence_parallel_input: bool = False,
        partition_stride: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if partition_stride < 1:
            raise ValueError(f"partition_stride must be >= 1, got {partition_stride}")
        if gather_output and skip_bias_add:
            raise ValueError(
                "ColumnParallelLinear: skip_bias_add with gather_output would hand back a "
                "bias shard next to a gathered output; add the bias inside the layer instead"
            )
        tp = state.tp_size
        _check_divisible(
            "ColumnParallelLinear out_features",
            out_features,
            tp * partition_stride,
            f"tensor_parallel {tp} x partition_stride {partition_stride}",
        )
        self.in_features = in_features
        self.out_features = out_features
        self.output_size_per_partition = out_features // tp
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel_input = sequence_parallel_input
        self.partition_stride = partition_stride
        self.tp_size = tp
        self.tp_group = state.tp_group

        master = master_weight((out_features, in_features), init_method)
        shard = split_tensor(master, 0, tp, state.tp_rank, partition_stride)
        del master
        self.weight = _parameter(shard, params_dtype, device)
        set_tensor_parallel_attributes(self.weight, tp > 1, 0, partition_stride)
        if bias:
            self.bias: nn.Parameter | None = _parameter(
                torch.zeros(self.output_size_per_partition), params_dtype, device
            )
            set_tensor_parallel_attributes(self.bias, tp > 1, 0, partition_stride)
        else:
            self.register_parameter("bias", None)

    @property
    def output_bias(self) -> nn.Parameter | None:
        """The bias the caller must add itself (None unless ``skip_bias_add``)."""
        return self.bias if self.skip_bias_add else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel_input:
            x = gather_from_sequence_parallel_region(x, self.tp_group)
        else:
            x = copy_to_tp_region(x, self.tp_group)
        out = self.linear_impl(x, self.weight, None if self.skip_bias_add else self.bias)
        if self.gather_output and self.tp_size > 1:
            out = gather_from_tp_region(out, self.tp_group)
            out = _unstride_last_dim(out, self.tp_size, self.partition_stride)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"per_partition={self.output_size_per_partition}, tp={self.tp_size}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"stride={self.partition_stride}"
        )


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split along its input (second) dim.

    Each rank multiplies its slice of the input features; the partial results are summed
    over the tensor-parallel group (all-reduce, or reduce-scatter along the sequence dim with
    ``sequence_parallel_output=True``) and the replicated bias is added once, after the sum.
    ``input_is_parallel=False`` splits a replicated input first. ``linear_impl`` as in
    :class:`ColumnParallelLinear`.
    """

    linear_impl: Callable[..., torch.Tensor] = staticmethod(F.linear)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        state: ParallelState,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
        skip_bias_add: bool = False,
        sequence_parallel_output: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        tp = state.tp_size
        _check_divisible("RowParallelLinear in_features", in_features, tp, f"tensor_parallel {tp}")
        self.in_features = in_features
        self.out_features = out_features
        self.input_size_per_partition = in_features // tp
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel_output = sequence_parallel_output
        self.tp_size = tp
        self.tp_group = state.tp_group

        master = master_weight((out_features, in_features), init_method)
        shard = split_tensor(master, 1, tp, state.tp_rank)
        del master
        self.weight = _parameter(shard, params_dtype, device)
        set_tensor_parallel_attributes(self.weight, tp > 1, 1, 1)
        if bias:
            self.bias: nn.Parameter | None = _parameter(
                torch.zeros(out_features), params_dtype, device
            )
            set_tensor_parallel_attributes(self.bias, False)
            self.bias.sequence_parallel = sequence_parallel_output and tp > 1  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    @property
    def output_bias(self) -> nn.Parameter | None:
        """The bias the caller must add itself (None unless ``skip_bias_add``)."""
        return self.bias if self.skip_bias_add else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        add_bias = self.bias is not None and not self.skip_bias_add
        if self.tp_size == 1:
            return self.linear_impl(x, self.weight, self.bias if add_bias else None)
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        partial = self.linear_impl(x, self.weight, None)
        if self.sequence_parallel_output:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:
            out = reduce_from_tp_region(partial, self.tp_group)
        if add_bias:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"per_partition={self.input_size_per_partition}, tp={self.tp_size}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary over the tensor-parallel group.

    Rank ``r`` owns rows ``[r * V/tp, (r+1) * V/tp)``; tokens it does not own produce zeros
    locally and the all-reduce fills in the owner's row.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        state: ParallelState,
        init_method: InitMethod,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        tp = state.tp_size
        _check_divisible(
            "VocabParallelEmbedding num_embeddings",
            num_embeddings,
            tp,
            f"tensor_parallel {tp} (pad the vocabulary)",
        )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = num_embeddings // tp
        self.vocab_start = state.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.tp_size = tp
        self.tp_group = state.tp_group

        master = master_weight((num_embeddings, embedding_dim), init_method)
        shard = split_tensor(master, 0, tp, state.tp_rank)
        del master
        self.weight = _parameter(shard, params_dtype, device)
        set_tensor_parallel_attributes(self.weight, tp > 1, 0, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"rows=[{self.vocab_start}, {self.vocab_end}), tp={self.tp_size}"
        )
