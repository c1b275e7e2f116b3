"""Autograd-aware communication at the borders of tensor-parallel regions.

Every function takes the process group explicitly (normally ``state.tp_group``) and is the
identity when the group has a single rank. ``None`` means "no group" (the
:meth:`ParallelState.single` case), never "the world group".

Tensor-parallel region (hidden dim split on the last axis):

=============================  =======================  =======================
function                       forward                  backward
=============================  =======================  =======================
copy_to_tp_region              identity                 all-reduce
reduce_from_tp_region          all-reduce               identity
scatter_to_tp_region           keep own last-dim chunk  all-gather last dim
gather_from_tp_region          all-gather last dim      keep own chunk
=============================  =======================  =======================

Sequence-parallel region (activations ``[seq, batch, hidden]`` split on the first axis):

==========================================  ====================  ====================
function                                    forward               backward
==========================================  ====================  ====================
scatter_to_sequence_parallel_region         keep own seq chunk    all-gather seq
gather_from_sequence_parallel_region        all-gather seq        reduce-scatter seq
reduce_scatter_to_sequence_parallel_region  reduce-scatter seq    all-gather seq
==========================================  ====================  ====================

Reduce-scatter fallback: some gloo builds have no ``reduce_scatter_tensor``. When the backend
raises "not supported" for it, :func:`reduce_scatter_first_dim` all-reduces the full tensor
and keeps this rank's chunk instead: the same result, ``world_size`` times the traffic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any


# --------------------------------------------------------------------- primitives
def group_size(group: ProcessGroup) -> int:
    """Ranks in ``group`` (1 for ``None``, the single-process case)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def _split_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(
            f"dimension {dim} of size {x.shape[dim]} is not divisible by the group size {world}"
        )
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _all_gather_stacked(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x`` stacked in group-rank order."""
    world = group_size(group)
    flat = x.contiguous().reshape(1, -1)
    # backends differ in whether they accept a stacked output; all take the concatenation
    out = torch.empty((world, flat.shape[1]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)
    return out.view(world, *x.shape)


def all_gather_dim(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (no autograd)."""
    if group_size(group) == 1:
        return x
    stacked = _all_gather_stacked(x, group)
    dim = dim % x.dim()
    if dim == 0:
        return stacked.reshape(stacked.shape[0] * x.shape[0], *x.shape[1:])
    return torch.cat(stacked.unbind(0), dim=dim)


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum of ``x`` over the group, as a new tensor (``x`` is left untouched)."""
    if group_size(group) == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _unsupported(err: Exception) -> bool:
    if isinstance(err, NotImplementedError):
        return True
    text = str(err).lower()
    return "not support" in text or "unsupported" in text or "not implemented" in text


def reduce_scatter_first_dim(
    x: torch.Tensor, group: ProcessGroup, *, native: bool = True
) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk of the first dimension (no autograd).

    Uses the backend's reduce-scatter; where the backend lacks it (older gloo), or with
    ``native=False``, falls back to an all-reduce of the whole tensor followed by taking this
    rank's chunk. The unsupported case is detected from the synchronous error the backend
    raises before communicating, which is identical on every rank.
    """
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[0] % world != 0:
        raise ValueError(
            f"first dimension of size {x.shape[0]} is not divisible by the group size {world}"
        )
    x = x.contiguous()
    if native:
        out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            scatter(out, x, group=group)
            return out
        except (RuntimeError, NotImplementedError, ValueError) as err:
            if not _unsupported(err):
                raise
    return all_reduce_sum(x, group).chunk(world, dim=0)[group_rank(group)].contiguous()


# ------------------------------------------------------------ tensor-parallel region
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce_sum(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split_dim(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_dim(grad, -1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce backward."""
    if group_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    if group_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Keep this rank's chunk of the last dim; backward all-gathers the gradient."""
    if group_size(group) == 1:
        return x
    return _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-gather the last dim; backward keeps this rank's chunk of the gradient."""
    if group_size(group) == 1:
        return x
    return _GatherFromTP.apply(x, group)


# ---------------------------------------------------------- sequence-parallel region
class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split_dim(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_dim(grad, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, group: ProcessGroup, tensor_parallel_output_grad: bool
    ) -> torch.Tensor:
        ctx.group = group
        ctx.reduce_grad = tensor_parallel_output_grad
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.reduce_grad:
            return reduce_scatter_first_dim(grad, ctx.group), None, None
        return _split_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_first_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_dim(grad, 0, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Keep this rank's chunk of the sequence (first) dim; backward all-gathers."""
    if group_size(group) == 1:
        return x
    return _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: ProcessGroup, *, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence dim.

    Backward reduce-scatters the gradient: the gathered tensor feeds a tensor-parallel layer
    whose ranks each contribute a partial gradient. Pass ``tensor_parallel_output_grad=False``
    when every rank computes the same full gradient; backward then only keeps its chunk.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: ProcessGroup
) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence chunk; backward all-gathers."""
    if group_size(group) == 1:
        return x
    return _ReduceScatterToSP.apply(x, group)
