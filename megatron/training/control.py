"""Loop control shared by all ranks: skipping non-finite steps, and the collective stop decision.

Both decisions are collective: every rank contributes its local view and all ranks act on the
all-reduced result, so no rank ever waits in a collective the others skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def world_max(values: list[float], group: Any = None) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=group)
    return tensor.tolist()


class StepGuard:
    """Skips an optimizer step on all ranks when the loss or the gradients are not finite.

    Before ``engine.step()`` at an accumulation boundary, :meth:`decide` all-reduces each
    rank's view (a non-finite loss in any micro batch, or a non-finite gradient where the
    gradients are visible on the parameters) into one decision. :meth:`install` wraps the
    step of the torch optimizer that DeepSpeed drives (also underneath its ZeRO and bf16
    wrappers): on a skipped step it clears the gradients instead of updating, so parameters
    and optimizer state are untouched. It also skips when DeepSpeed's own global gradient norm
    (computed across all ranks before the update) is not finite. Steps that DeepSpeed skips
    itself before reaching the torch optimizer (the fp16 loss scaler, the bf16 overflow
    check) are counted as skipped too.
    """

    def __init__(self, max_consecutive: int, group: Any = None):
        self.max_consecutive = max_consecutive
        self.group = group
        self.local_bad = False
        self.skip = False
        self.decided = False
        self.stepped = False
        self.skipped_now = False
        self.skipped_total = 0
        self.consecutive = 0
        self._engine_optimizer: Any = None
        self._loss_checks: list[torch.Tensor] = []

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record a micro batch's loss. The finiteness check stays on the loss's device until
        :meth:`decide` reads all of a step's checks at once (one host sync per step on GPUs)."""
        self._loss_checks.append(torch.isfinite(loss.detach()).all())

    def _losses_finite(self) -> bool:
        checks, self._loss_checks = self._loss_checks, []
        if not checks:
            return True
        return bool(torch.stack(checks).all()) if len(checks) > 1 else bool(checks[0])

    def install(self, optimizer: torch.optim.Optimizer, engine_optimizer: Any = None,
                pre_update: Any = None) -> None:
        """Wrap ``optimizer.step``; ``engine_optimizer`` is DeepSpeed's wrapper around it and
        ``pre_update`` (optional) runs just before an update that is applied."""
        original = optimizer.step
        self._engine_optimizer = engine_optimizer

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if not self.decided:  # the pipeline engine steps inside train_batch()
                self.decide(())
            self.stepped = True
            norms = [getattr(self._engine_optimizer, "_global_grad_norm", None)]
            if pre_update is not None and not self.skip:
                norms.append(pre_update())  # collective; returns the global norm it clipped by
            finite = all(n is None or math.isfinite(float(n)) for n in norms)
            if self.skip or not finite:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
                self.skipped_now = True
                return None
            return original(*args, **kwargs)

        optimizer.step = guarded_step  # type: ignore[method-assign]

    def decide(self, params: Iterable[torch.nn.Parameter] = (), *,
               grads_finite: bool | None = None) -> bool:
        """The collective decision for this step; call on every rank before engine.step().

        ``grads_finite`` is this rank's verdict on its gradients when the caller already has
        it (the trainer derives it from the per-parameter gradient norms it computes anyway
        for clipping and logging); otherwise the gradients of ``params`` are checked here."""
        if not self._losses_finite():
            self.local_bad = True
        if grads_finite is None:
            grads_finite = _grads_finite(params)
        bad = self.local_bad or not grads_finite
        self.skip = world_max([float(bad)], self.group)[0] > 0
        self.decided = True
        return self.skip

    def end_step(self) -> bool:
        """Call after the boundary's ``engine.step()``; returns True if the step was skipped."""
        skipped = self.skip or self.skipped_now or not self.stepped
        self.local_bad = self.skip = self.decided = self.stepped = self.skipped_now = False
        self._loss_checks = []
        if skipped:
            self.skipped_total += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} optimizer steps in a row were skipped for a non-finite "
                f"loss or gradient (max_consecutive_skipped_iters={self.max_consecutive}); "
                "lower the learning rate or check the data")
        return skipped


class NonFiniteError(RuntimeError):
    pass


def _grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms ``[n]`` in fp32 from one fused multi-tensor pass (no copies; 16-bit
    gradients are accumulated in fp32). A norm is non-finite exactly when its tensor holds a
    non-finite value (or its sum of squares overflows fp32), so the same numbers serve the
    step guard, gradient clipping and the logged global norm."""
    if all(g.dtype == torch.float32 for g in grads):
        return torch.stack(torch._foreach_norm(grads))
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))

