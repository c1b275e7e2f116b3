"""Token exchange between expert-parallel ranks.

With expert parallelism every rank of an expert-parallel group (``state.ep_group``) holds
``E / ep`` consecutive experts. :class:`ExpertExchange` sends each rank's tokens, sorted by
global expert id, to the ranks holding their experts (``all_to_all_single``, which gloo
supports on CPU), regroups the received rows by local expert, and sends the expert outputs
back in the original order. The exchange is differentiable: backward runs the reverse
all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.parallel.state import ParallelState, ProcessGroup


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
