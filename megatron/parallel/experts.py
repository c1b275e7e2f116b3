"""Token exchange between expert-parallel ranks.

With expert parallelism every rank of an expert-parallel group (``state.ep_group``) holds
``E / ep`` consecutive experts. :class:`ExpertExchange` sends each rank's tokens, sorted by
global expert id, to the ranks holding their experts (``all_to_all_single``, which gloo
supports on CPU), regroups the received rows by local expert, and sends the expert outputs
back in the original order. The exchange is differentiable: backward runs the reverse
all-to-all.

Expert parameters exist only on the ranks that hold them, so their gradients are reduced over
the expert-data-parallel group (``state.edp_group``: the data-parallel ranks holding the same
experts) instead of the data-parallel group. This uses DeepSpeed's own MoE support:
:func:`mark_expert_parameters` tags them as DeepSpeed's MoE layers do (``allreduce = False``
and the ``group_name`` of their groups), :func:`register_expert_groups` enters this rank's
groups under that name in DeepSpeed's group registry, and :class:`DeepSpeedExpertMarker`, a
parameterless child of every MoE block, makes the engine see MoE layers. The engine then
all-reduces expert gradients over the expert-data-parallel group (dividing by the full
data-parallel size, so the result is the gradient of the data-parallel mean loss), and ZeRO 1/2
partition the expert parameter groups (:func:`split_expert_param_groups`) over that group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.parallel.state import ParallelState, ProcessGroup


# ---------------------------------------------------------------- DeepSpeed's MoE support
def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the groups of expert-parallel size ``ep``."""
    return f"ep_size_{ep}"


def register_expert_groups(state: ParallelState) -> str:
    """Enter this rank's expert-parallel and expert-data-parallel groups in DeepSpeed's group
    registry (read by its engine and ZeRO optimizers); returns their name."""
    from deepspeed.utils import groups

    name = expert_group_name(state.ep_size)
    groups._EXPERT_PARALLEL_GROUP[name] = state.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(state.ep_ranks)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = state.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(state.edp_ranks)
    return name


def mark_expert_parameters(params: list[torch.nn.Parameter], group_name: str) -> None:
    """Tag expert shards as DeepSpeed's MoE layers do: not all-reduced over data parallel, but
    over the expert-data-parallel group named ``group_name``."""
    for param in params:
        param.allreduce = False
        param.group_name = group_name


def is_expert_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` is an expert shard (:func:`mark_expert_parameters`)."""
    return getattr(param, "allreduce", True) is False and hasattr(param, "group_name")


def split_expert_param_groups(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with the expert shards in groups of their own (marked
    ``moe``), as DeepSpeed's ZeRO optimizers require; unchanged without expert shards."""
    groups = [{**g, "params": list(g["params"])} for g in groups]
    if not any(is_expert_parameter(p) for g in groups for p in g["params"]):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{**g, "name": g.get("name", f"group{i}")} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


@functools.cache
def _marker_class() -> type:
    from deepspeed.moe.layer import MoE

    return type("DeepSpeedExpertMarker", (DeepSpeedExpertMarker, MoE), {})


class DeepSpeedExpertMarker(torch.nn.Module):
    """A parameterless stand-in for DeepSpeed's ``MoE`` layer (an instance of it, so that
    ``deepspeed.initialize`` turns on its MoE gradient reduction and ZeRO groups); built by
    :func:`deepspeed_expert_marker`. It has no parameters and is never called."""

    num_experts: int
    num_local_experts: int
    ep_size: int
    expert_group_name: str
    enable_expert_tensor_parallelism: bool = True

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups are already registered (:func:`register_expert_groups`)."""

    def forward(self, *args: Any) -> None:
        raise RuntimeError("DeepSpeedExpertMarker is a marker and is never called")


def deepspeed_expert_marker(num_experts: int, ep: int, group_name: str) -> torch.nn.Module:
    """A :class:`DeepSpeedExpertMarker` that is also a DeepSpeed ``MoE`` instance."""
    cls = _marker_class()
    marker = cls.__new__(cls)
    torch.nn.Module.__init__(marker)
    marker.num_experts, marker.ep_size = num_experts, ep
    marker.num_local_experts, marker.expert_group_name = num_experts // ep, group_name
    return marker


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup, out_splits: list[int],
                in_splits: list[int]) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits,
                               group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, group: ProcessGroup, out_splits: list[int],
               in_splits: list[int]) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along the first dim."""
    return _AllToAll.apply(x, group, out_splits, in_splits)


@dataclass
class ExchangePlan:
    """How one batch of rows was exchanged (kept to send the outputs back)."""

    local_counts: list[int]  # received rows per local expert
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup: torch.Tensor | None = None  # received row order -> grouped by local expert


class ExpertExchange:
    """Dispatch of expert-sorted rows to the ranks of their experts and back."""

    def __init__(self, state: ParallelState, local_experts: int) -> None:
        self.group = state.ep_group
        self.ep = state.ep_size
        self.local_experts = local_experts

    def dispatch(self, rows: torch.Tensor,
                 counts: torch.Tensor) -> tuple[torch.Tensor, ExchangePlan]:
        """``rows`` sorted by global expert, ``counts [E]`` rows per expert -> the rows this
        rank's experts process, grouped by local expert, and the plan to send them back."""
        if self.ep == 1:
            return rows, ExchangePlan([int(c) for c in counts.tolist()])
        counts = counts.to(torch.int64)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        per_source = received_counts.view(self.ep, self.local_experts)  # [source, local expert]
        send = [int(c) for c in counts.view(self.ep, self.local_experts).sum(1).tolist()]
        recv = [int(c) for c in per_source.sum(1).tolist()]
        received = all_to_all(rows, self.group, recv, send)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.local_experts, device=rows.device).repeat(self.ep),
            per_source.reshape(-1).to(rows.device),
        )  # fmt: skip
        regroup = torch.argsort(expert_of_row, stable=True)
        local_counts = [int(c) for c in per_source.sum(0).tolist()]
        return received[regroup], ExchangePlan(local_counts, send, recv, regroup)

    def combine(self, out: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        """Expert outputs (grouped by local expert) back to the sender, in its row order."""
        if self.ep == 1:
            return out
        assert plan.regroup is not None and plan.send_splits and plan.recv_splits is not None
        ungrouped = torch.empty_like(out).index_copy(0, plan.regroup, out)
        return all_to_all(ungrouped, self.group, plan.send_splits, plan.recv_splits)
