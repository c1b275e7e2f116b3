"""The learning-rate schedule: linear warmup, then constant, linear, cosine or exponential decay.

With ``n`` optimizer steps done, ``W`` warmup iterations, ``T`` total (decay) iterations,
peak ``lr`` and floor ``min_lr``, the learning rate of the next step is::

    n <= W (W > 0):   lr * n / W                                   (warmup from 0)
    W < n <= T:       p = (n - W) / (T - W)                        (decay progress, 0..1)
        constant      lr
        linear        min_lr + (lr - min_lr) * (1 - p)
        cosine        min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))
        exponential   max(min_lr, lr * 0.1 ** p)                   (lr falls 10x over the decay)
    n > T:            the value at the end of the decay (min_lr for linear and cosine,
                      max(min_lr, lr / 10) for exponential, lr for constant)

The scheduler writes the value into every optimizer parameter group at each :meth:`step`,
times the group's ``lr_scale`` when it has one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron.neox_arguments.groups_training import LRArgs, OptimizerArgs

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")

# Checkpoint keys (the names GPT-NeoX checkpoints use, so their scheduler state loads here).
_CONFIG_FIELDS = {
    "start_lr": "start_lr",
    "warmup_iter": "warmup_iters",
    "end_iter": "total_iters",
    "decay_style": "decay_style",
    "min_lr": "min_lr",
}


def scheduled_lr(num_iters: int, *, start_lr: float, warmup_iters: int, total_iters: int,
                 decay_style: str, min_lr: float) -> float:
    """The learning rate after ``num_iters`` optimizer steps (the module docstring's formula)."""
    if warmup_iters > 0 and num_iters <= warmup_iters:
        return start_lr * num_iters / warmup_iters
    if decay_style == "constant":
        return start_lr
    span = total_iters - warmup_iters
    progress = 1.0 if span <= 0 else min(1.0, (num_iters - warmup_iters) / span)
    if decay_style == "linear":
        return min_lr + (start_lr - min_lr) * (1.0 - progress)
    if decay_style == "cosine":
        return min_lr + (start_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay_style == "exponential":
        return max(min_lr, start_lr * 0.1 ** progress)
    raise ValueError(f"lr_decay_style: {decay_style!r} is not one of {', '.join(DECAY_STYLES)}")


class AnnealingLR:
    """Warmup + decay schedule driving an optimizer's learning rate.

    ``get_lr()`` is the learning rate of the next optimizer step; call ``step()`` after each
    optimizer step (``step(k)`` after ``k`` of them, e.g. when skipping ahead on resume).

    Checkpoints: :meth:`state_dict` stores the schedule's settings and the step count. When
    loading, the stored settings must match this scheduler's (built from the config) unless

    * ``override_lr_scheduler``: keep the config's settings, take only the step count;
    * ``use_checkpoint_lr_scheduler``: take the settings (and the step count) from the
      checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, start_lr: float, warmup_iters: int,
                 total_iters: int, decay_style: str, min_lr: float, last_iter: int = 0,
                 override_lr_scheduler: bool = False,
                 use_checkpoint_lr_scheduler: bool = False) -> None:
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style: {decay_style!r} is not one of "
                             f"{', '.join(DECAY_STYLES)}")
        if override_lr_scheduler and use_checkpoint_lr_scheduler:
            raise ValueError("override_lr_scheduler and use_checkpoint_lr_scheduler are both "
                             "set; choose one")
        if total_iters < 0 or warmup_iters < 0:
            raise ValueError(f"lr schedule: negative iterations (warmup {warmup_iters}, total "
                             f"{total_iters})")
        if start_lr < 0 or min_lr < 0:
            raise ValueError(f"lr schedule: negative learning rate (lr {start_lr}, min_lr "
                             f"{min_lr})")
        self.optimizer = optimizer
        self.start_lr = float(start_lr)
        self.warmup_iters = int(warmup_iters)
        self.total_iters = int(total_iters)
        self.decay_style = decay_style
        self.min_lr = float(min_lr)
        self.override_lr_scheduler = override_lr_scheduler
        self.use_checkpoint_lr_scheduler = use_checkpoint_lr_scheduler
        self.num_iters = int(last_iter)
        self._apply()

    def get_lr(self) -> float:
        return scheduled_lr(self.num_iters, start_lr=self.start_lr,
                            warmup_iters=self.warmup_iters, total_iters=self.total_iters,
                            decay_style=self.decay_style, min_lr=self.min_lr)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))

    def step(self, num_iters: int = 1) -> None:
        """Advance by ``num_iters`` optimizer steps and set the new learning rate."""
        if num_iters < 0:
            raise ValueError(f"step: num_iters must not be negative, got {num_iters}")
        self.num_iters += num_iters
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {key: getattr(self, attr) for key, attr in _CONFIG_FIELDS.items()}
        state["num_iters"] = self.num_iters
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count, and the settings according to the flags (class docstring)."""
        missing = [k for k in (*_CONFIG_FIELDS, "num_iters") if k not in state]
        if missing:
            raise ValueError(f"lr scheduler checkpoint lacks {', '.join(missing)}")
        if self.use_checkpoint_lr_scheduler:
            for key, attr in _CONFIG_FIELDS.items():
                value = state[key]
                setattr(self, attr, value if isinstance(value, str) else type(getattr(
                    self, attr))(value))
        elif not self.override_lr_scheduler:
            for key, attr in _CONFIG_FIELDS.items():
                ours, theirs = getattr(self, attr), state[key]
                same = ours == theirs if isinstance(ours, str) else math.isclose(
                    float(ours), float(theirs), rel_tol=1e-9, abs_tol=0.0)
                if not same:
                    raise ValueError(
                        f"lr scheduler: the checkpoint has {attr}={theirs!r} but the config gives "
                        f"{ours!r}; set override_lr_scheduler (keep the config) or "
                        "use_checkpoint_lr_scheduler (keep the checkpoint)")
        self.num_iters = int(state["num_iters"])
        self._apply()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_args: LRArgs,
                       optim_args: OptimizerArgs, train_iters: int | None,
                       *, last_iter: int = 0) -> AnnealingLR:
    """The schedule of the config: peak ``lr``, ``lr_decay_style``, ``min_lr``, decay over
    ``lr_decay_iters`` (``train_iters`` when unset) with ``int(warmup * lr_decay_iters)``
    warmup iterations."""
    total = lr_args.lr_decay_iters if lr_args.lr_decay_iters is not None else train_iters
    if total is None:
        raise ValueError("lr_decay_iters: unknown (set lr_decay_iters or train_iters)")
    if optim_args.lr is None:
        raise ValueError("lr: no peak learning rate (set lr or optimizer.params.lr)")
    return AnnealingLR(
        optimizer,
        start_lr=optim_args.lr,
        warmup_iters=int(lr_args.warmup * total),
        total_iters=total,
        decay_style=lr_args.lr_decay_style,
        min_lr=lr_args.min_lr,
        last_iter=last_iter,
        override_lr_scheduler=lr_args.override_lr_scheduler,
        use_checkpoint_lr_scheduler=lr_args.use_checkpoint_lr_scheduler,
    )
