"""The optimizer named by the config's ``optimizer`` block, and its parameter groups.

* :func:`param_groups` splits a model's trainable parameters into a weight-decay group and a
  no-weight-decay group (biases, normalization parameters, anything marked
  ``param._no_weight_decay = True``).
* :func:`build_optimizer` turns ``{type, params}`` into a ``torch.optim.Optimizer`` and says
  whether DeepSpeed's ZeRO has tested that optimizer class.
* :func:`check_zero_compat` fails early, with a one-line message, when ZeRO is on and the
  optimizer is untested unless ``zero_allow_untested_optimizer`` is set.

Weight decay is decoupled (AdamW-style, ``p -= lr * weight_decay * p``) for every optimizer
except SGD, where torch adds it to the gradient (L2). GPT-NeoX's ``Adam`` is decoupled too,
so ``Adam`` and ``AdamW`` both build :class:`torch.optim.AdamW` (bitsandbytes' 8-bit Adam with
``use_bnb_optimizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from megatron import accelerator
from megatron.neox_arguments.groups_training import OptimizerArgs
from megatron.training.optimizer_params import (  # noqa: F401 - names of this module too
    ACCEPTED_PARAMS,
    UNSUPPORTED,
    optimizer_kwargs,
)

# --------------------------------------------------------------------------------------------
# Parameter groups


def _is_norm_module(module: nn.Module) -> bool:
    # torch's LayerNorm, GroupNorm and RMSNorm and the model's LayerNorm/RMSNorm/ScaleNorm
    # all end with "Norm"; subclasses of torch's norms may not.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or \
        type(module).__name__.endswith("Norm")


def _true_ndim(param: torch.Tensor) -> int:
    # Under ZeRO-3 a partitioned parameter is an empty placeholder; ds_shape is its real shape.
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def skips_weight_decay(name: str, param: torch.Tensor, owner: nn.Module | None = None) -> bool:
    """The no-weight-decay rule.

    A parameter gets no weight decay when any of these holds:

    * it has fewer than two dimensions (biases, LayerNorm/RMSNorm weights and biases, the
      ScaleNorm scalar);
    * its name ends with ``bias``;
    * it belongs to a normalization module (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``
      or any class whose name ends with ``Norm``);
    * it is marked ``param._no_weight_decay = True``.

    Everything else (linear and embedding weights) is decayed.
    """
    if getattr(param, "_no_weight_decay", False):
        return True
    if _true_ndim(param) < 2 or name.rsplit(".", 1)[-1].endswith("bias"):
        return True
    return owner is not None and _is_norm_module(owner)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay":
    0.0}]`` for the trainable parameters of ``model`` (any ``nn.Module``, a DeepSpeed
    ``PipelineModule`` included).

    Parameters keep the order of ``model.named_modules()`` (registration order, so the same
    on every rank and every run); a parameter shared by several modules (tied weights) appears
    once, where it is first met. Empty groups are left out.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            (no_decay if skips_weight_decay(full_name, param, module) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------
# Lion and SM3


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    Per step, with gradient ``g`` and momentum ``m``::

        c = beta1 * m + (1 - beta1) * g
        p = p - lr * weight_decay * p          # decoupled weight decay
        p = p - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"Lion: lr must be non-negative, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                g = p.grad
                direction = torch.lerp(m, g, 1.0 - beta1).sign_()
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(direction, alpha=-lr)
                m.lerp_(g, 1.0 - beta2)
        return loss


class SM3(torch.optim.Optimizer):
    """SM3-II (Anil et al. 2019, "Memory-Efficient Adaptive Optimization").

    The cover of a parameter of ``k`` dimensions is its slices along each dimension: one
    accumulator per dimension, shaped like the parameter with every other dimension reduced to
    1 (a matrix keeps ``rows + cols`` numbers, a vector a full accumulator). Per step::

        nu = min over dimensions d of acc_d (broadcast)  +  g * g
        acc_d = max of nu over every dimension except d
        update = g / (sqrt(nu) + eps)
        m = momentum * m + (1 - momentum) * update      # only when momentum > 0
        p = p - lr * weight_decay * p                   # decoupled, only when set
        p = p - lr * (m if momentum > 0 else update)

    ``beta`` is accepted for GPT-NeoX configs but only 0 (the paper's sum of squares).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.0,
                 beta: float = 0.0, eps: float = 1e-30, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"SM3: lr must be non-negative, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SM3: momentum must lie in [0, 1), got {momentum}")
        if beta != 0.0:
            raise ValueError(f"SM3: only beta 0 (sums of squared gradients) is implemented, "
                             f"got {beta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta": beta, "eps": eps,
                                  "weight_decay": weight_decay})

    @staticmethod
    def accumulator_shapes(shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Shapes of the accumulators of a parameter of ``shape``."""
        if len(shape) == 0:
            return [()]
        return [tuple(n if i == d else 1 for i, n in enumerate(shape))
                for d in range(len(shape))]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, eps, wd = group["lr"], group["momentum"], group["eps"], \
                group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SM3 does not support sparse gradients")
                g = p.grad
                state = self.state[p]
                if not state:
                    state["accumulators"] = [torch.zeros(s, dtype=p.dtype, device=p.device)
                                             for s in self.accumulator_shapes(p.shape)]
                    if momentum > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                accs: list[torch.Tensor] = state["accumulators"]
                nu = accs[0]
                for acc in accs[1:]:
                    nu = torch.minimum(nu, acc)
                nu = nu + g * g
                for d, acc in enumerate(accs):
                    others = [i for i in range(p.ndim) if i != d]
                    acc.copy_(nu.amax(dim=others, keepdim=True) if others else nu)
                update = g / nu.sqrt().add_(eps)
                if momentum > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(update, alpha=1.0 - momentum)
                    update = buf
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss


# --------------------------------------------------------------------------------------------
# Building the optimizer


class BuiltOptimizer(NamedTuple):
    optimizer: torch.optim.Optimizer
    zero_tested: bool  # DeepSpeed ZeRO accepts it without zero_allow_untested_optimizer


def _groups(model_or_groups: nn.Module | Iterable[Any], weight_decay: float) -> list[Any]:
    if isinstance(model_or_groups, nn.Module):
        groups: list[Any] = param_groups(model_or_groups, weight_decay)
    else:
        groups = list(model_or_groups)
    if not groups:
        raise ValueError("the model has no trainable parameters to optimize")
    return groups


def _all_params(groups: list[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for g in groups:
        out += list(g["params"]) if isinstance(g, dict) else [g]
    return out


def _torch_adamw(groups: list[Any], kwargs: dict[str, Any], *, allow_fused: bool) -> Any:
    fused = allow_fused and accelerator.is_gpu() and all(
        t.device.type != "cpu" and t.is_floating_point() for t in _all_params(groups))
    impl = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, **kwargs, **impl)


def _bnb_adam8bit(groups: list[Any], kwargs: dict[str, Any]) -> Any:
    """bitsandbytes' 8-bit Adam (``use_bnb_optimizer``): the moments are kept as block-wise
    quantized 8-bit values (parameters under 4096 elements keep 32-bit state); its weight
    decay is decoupled, as for ``Adam``/``AdamW`` here."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("use_bnb_optimizer: needs the bitsandbytes package "
                         "(pip install bitsandbytes)") from None
    return bnb.optim.Adam8bit(groups, **kwargs)


def _one_bit_adam_problem() -> str | None:
    """Why DeepSpeed's 1-bit Adam cannot run in this process (None when it can)."""
    if not accelerator.is_gpu() or accelerator.communication_backend() != "nccl":
        return ("optimizer.type OneBitAdam: DeepSpeed's 1-bit Adam needs GPUs with NCCL and "
                "this run is on CPU ranks; use Adam or AdamW")
    try:
        from deepspeed.runtime.fp16.onebit.adam import OnebitAdam  # noqa: F401
    except ImportError:
        import deepspeed

        return (f"optimizer.type OneBitAdam: the installed DeepSpeed {deepspeed.__version__} "
                "has no 1-bit Adam; use Adam or AdamW")
    return None


def uses_deepspeed_optimizer(optim_args: OptimizerArgs) -> bool:
    """True when DeepSpeed must build the optimizer from the config's ``optimizer`` block.

    1-bit Adam turns the engine's own gradient all-reduce off after its warmup, so it needs
    the engine when it is constructed: the trainer then passes the block to
    ``deepspeed.initialize`` (``build_deepspeed_config(cfg, client_optimizer=False)``)
    instead of calling :func:`build_optimizer`.
    """
    return optim_args.optimizer_type == "OneBitAdam"


def check_optimizer_supported(optim_args: OptimizerArgs) -> None:
    """Raise a one-line ValueError when the configured optimizer cannot run in this process
    (unsupported type, unknown params, 1-bit Adam without GPUs/NCCL)."""
    optimizer_kwargs(optim_args)
    if optim_args.optimizer_type == "OneBitAdam":
        problem = _one_bit_adam_problem()
        if problem:
            raise ValueError(problem)


def build_optimizer(optim_args: OptimizerArgs,
                    model_or_groups: nn.Module | Iterable[Any]) -> BuiltOptimizer:
    """The optimizer of ``optim_args.optimizer`` over a model (split by :func:`param_groups`
    with the weight decay) or over ready-made parameter groups.

    Returns ``(optimizer, zero_tested)``. ``optimizer.params`` are passed through (see
    :func:`optimizer_kwargs`); unknown ones raise a ValueError naming
    ``optimizer.params.<name>``. 1-bit Adam is built by DeepSpeed (see
    :func:`uses_deepspeed_optimizer`) and raises here with the reason.
    """
    kwargs = optimizer_kwargs(optim_args)
    kind = optim_args.optimizer_type
    if kind == "OneBitAdam":
        raise ValueError(_one_bit_adam_problem() or (
            "optimizer.type OneBitAdam: 1-bit Adam needs DeepSpeed's engine and is built by "
            "deepspeed.initialize from the optimizer block (uses_deepspeed_optimizer)"))
    groups = _groups(model_or_groups, kwargs["weight_decay"])
    optimizer: torch.optim.Optimizer
    if kind in ("Adam", "AdamW") and optim_args.use_bnb_optimizer:
        optimizer = _bnb_adam8bit(groups, kwargs)
    elif kind in ("Adam", "AdamW"):
        optimizer = _torch_adamw(groups, kwargs, allow_fused=True)
    elif kind == "CPU_torch_adam":
        on_device = [t for t in _all_params(groups) if t.device.type != "cpu"]
        if on_device:
            raise ValueError(f"optimizer.type {kind}: parameters must live on the CPU (ZeRO "
                             f"optimizer offload); found one on {on_device[0].device}")
        optimizer = _torch_adamw(groups, kwargs, allow_fused=False)
    elif kind == "SGD":
        optimizer = torch.optim.SGD(groups, **kwargs)
    elif kind == "Lion":
        optimizer = Lion(groups, **kwargs)
    elif kind == "SM3":
        optimizer = SM3(groups, **kwargs)
    elif kind == "CPU_Adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        kwargs.setdefault("adamw_mode", True)
        optimizer = DeepSpeedCPUAdam(groups, **kwargs)
    else:  # pragma: no cover - ACCEPTED_PARAMS and this chain list the same types
        raise ValueError(f"optimizer.type {kind} has no builder")
    return BuiltOptimizer(optimizer, is_zero_tested(optimizer))


def is_zero_tested(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether DeepSpeed's ZeRO takes this optimizer class without
    ``zero_allow_untested_optimizer`` (DeepSpeed's own list: torch Adam, AdamW and Adagrad and
    DeepSpeed's Adam, Adagrad and Lion kernels). None (built by DeepSpeed) counts as untested."""
    if optimizer is None:
        return False
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    return type(optimizer) in ZERO_SUPPORTED_OPTIMIZERS


def check_zero_compat(optim_args: OptimizerArgs, zero_stage: int,
                      optimizer: torch.optim.Optimizer | None) -> None:
    """Raise a one-line ValueError when ZeRO (stage >= 1) would refuse ``optimizer``.

    DeepSpeed asserts deep inside ``deepspeed.initialize`` when ZeRO meets an optimizer it has
    not tested and ``zero_allow_untested_optimizer`` is false; this says so before any engine
    is built.
    """
    if zero_stage <= 0 or optim_args.zero_allow_untested_optimizer or is_zero_tested(optimizer):
        return
    name = type(optimizer).__name__ if optimizer is not None else "built by DeepSpeed"
    raise ValueError(f"optimizer.type {optim_args.optimizer_type} ({name}) is untested with "
                     f"ZeRO stage {zero_stage}; set zero_allow_untested_optimizer: true to use "
                     "it anyway, or choose Adam, AdamW or CPU_Adam")
