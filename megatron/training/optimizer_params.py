"""The keyword arguments an optimizer is built with, from the config's ``optimizer`` block.

Plain Python (no torch): the config validator checks them before anything is launched, and
:mod:`megatron.training.optimizers` builds the optimizer from them.
"""

from __future__ import annotations

from typing import Any

from megatron.neox_arguments.groups_training import OptimizerArgs

# Parameters each optimizer type accepts in ``optimizer.params`` (lr is always accepted; the
# resolved ``lr`` key wins over it).
ACCEPTED_PARAMS: dict[str, frozenset[str]] = {
    "Adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "AdamW": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "CPU_torch_adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad"}),
    "SGD": frozenset({"lr", "momentum", "dampening", "nesterov", "weight_decay"}),
    "Lion": frozenset({"lr", "betas", "weight_decay"}),
    "SM3": frozenset({"lr", "momentum", "beta", "eps", "weight_decay"}),
    "CPU_Adam": frozenset({"lr", "betas", "eps", "weight_decay", "bias_correction",
                           "adamw_mode"}),
    "OneBitAdam": frozenset({"lr", "betas", "eps", "weight_decay", "freeze_step",
                             "cuda_aware", "comm_backend_name"}),
}


UNSUPPORTED = {
    "madgrad_wd": "optimizer.type madgrad_wd is not supported; use AdamW, Lion or SM3",
}


def _betas(value: Any) -> tuple[float, float]:
    try:
        b1, b2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"optimizer.params.betas: needs two numbers, got {value!r}") from None
    return b1, b2


def optimizer_kwargs(optim_args: OptimizerArgs) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with: ``optimizer.params`` checked against
    the type's accepted names, ``lr`` from the resolved ``lr`` key and ``weight_decay`` from the
    top-level key unless the params give one."""
    kind = optim_args.optimizer_type
    if kind in UNSUPPORTED:
        raise ValueError(UNSUPPORTED[kind])
    accepted = ACCEPTED_PARAMS.get(kind)
    if accepted is None:
        raise ValueError(f"optimizer.type: {kind!r} is not one of {', '.join(ACCEPTED_PARAMS)}")
    params = dict((optim_args.optimizer or {}).get("params") or {})
    for name in params:
        if name not in accepted:
            raise ValueError(f"optimizer.params.{name}: not a parameter of optimizer.type "
                             f"{kind} (accepted: {', '.join(sorted(accepted))})")
    lr = optim_args.lr if optim_args.lr is not None else params.get("lr")
    if lr is None:
        raise ValueError("optimizer.params.lr: no learning rate (set lr or optimizer.params.lr)")
    params["lr"] = float(lr)
    if "betas" in params:
        params["betas"] = _betas(params["betas"])
    params["weight_decay"] = float(params.get("weight_decay", optim_args.weight_decay))
    return params
