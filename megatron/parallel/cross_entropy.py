"""Cross entropy over logits split along the vocabulary.

The output layer is a ``ColumnParallelLinear`` without ``gather_output``, so rank ``r``
holds the logits of vocabulary entries ``[r * V/tp, (r+1) * V/tp)``. The loss is computed
without ever gathering the logits:

1. the per-token maximum is all-reduced (MAX) for a numerically stable softmax;
2. the target's shifted logit (zero on ranks not owning the target), the local sum of
   ``exp`` and, with label smoothing, the local sum of shifted logits are all-reduced (SUM)
   together in one call;
3. ``loss = log(sum exp) - target_logit``; with smoothing ``eps`` (as in
   ``torch.nn.functional.cross_entropy``) ``(1 - eps) * loss + eps * (log(sum exp) -
   mean_j logit_j)``.

Backward needs no communication: each rank forms ``softmax - target_distribution`` on its own
slice of the vocabulary. Everything runs in fp32 whatever the logits' dtype; the gradient is
returned in the logits' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron.parallel.mappings import group_size
from megatron.parallel.state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        state: ParallelState,
        label_smoothing: float,
    ) -> torch.Tensor:
        group = state.tp_group
        distributed = group_size(group) > 1
        shard = logits.shape[-1]
        vocab = shard * state.tp_size
        start = state.tp_rank * shard

        x = logits.float()
        row_max = x.max(dim=-1).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - row_max.unsqueeze(-1)

        outside = (target < start) | (target >= start + shard)
        local_target = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        sums = [target_logit]
        if label_smoothing > 0.0:
            sums.append(shifted.sum(dim=-1))
        exp = shifted.exp_()  # ``shifted`` is our own fp32 buffer; reuse it for the softmax
        sums.append(exp.sum(dim=-1))
        packed = torch.stack(sums)
        if distributed:
            dist.all_reduce(packed, group=group)
        target_logit, sum_exp = packed[0], packed[-1]

        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit
        if label_smoothing > 0.0:
            mean_logit = packed[1] / vocab
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum_exp - mean_logit)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.label_smoothing = label_smoothing
        ctx.vocab = vocab
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, local_target, outside = ctx.saved_tensors
        eps = ctx.label_smoothing
        # Reuse the saved softmax buffer (a second backward through this graph then fails
        # loudly on the version check instead of silently using a modified tensor).
        grad = softmax
        # subtract the target distribution: (1 - eps) on the target (on its owner), eps / V
        # everywhere
        owned = (~outside).to(grad.dtype) * (1.0 - eps)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -owned.unsqueeze(-1))
        if eps > 0.0:
            grad.sub_(eps / ctx.vocab)
        grad.mul_(grad_loss.unsqueeze(-1).float())
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    state: ParallelState,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-token cross entropy (no reduction, fp32) of vocab-split logits.

    ``logits_shard``: ``[..., V / tp]``, this rank's slice of the vocabulary; ``target``:
    ``[...]`` token ids in ``[0, V)``. Returns ``[...]`` losses, equal on all tensor-parallel
    ranks. There is no ignore index: mask the per-token losses instead.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits_shard.shape)} and target {tuple(target.shape)} disagree "
            "on the token dimensions"
        )
    return _VocabParallelCrossEntropy.apply(logits_shard, target, state, float(label_smoothing))
