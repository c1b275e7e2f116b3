"""Checks of single values that a damaged or hostile config could carry: non-finite numbers,
sizes no machine could build, optimizer parameters the optimizer would refuse at launch, and
launcher values that reach a remote shell.

They run in ``resolve_config`` like the other checks, so ``deepy.py --dry-run`` and a launch
accept and refuse the same configs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig
    from megatron.neox_arguments.resolve import Locator

# Far beyond any published model, small enough that building the per-layer plan or a position
# table of that size cannot exhaust memory before the config is refused.
SIZE_LIMITS = {
    "num_layers": 1 << 16,
    "hidden_size": 1 << 20,
    "num_attention_heads": 1 << 16,
    "num_kv_heads": 1 << 16,
    "intermediate_size": 1 << 24,
    "seq_length": 1 << 24,
    "max_position_embeddings": 1 << 24,
}

# A host name (RFC 1123 labels), an IPv4 address or a bare IPv6 address: nothing a shell
# would read as more than one word.
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
                   r"[A-Za-z0-9])?)*|[0-9A-Fa-f:]+(?:%[A-Za-z0-9]+)?)$")


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _finite_numbers(cfg: NeoXConfig, loc: Locator) -> None:
    """Every number of every section is finite (NaN passes every ``<`` check silently)."""
    for section in cfg.sections().values():
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(_non_finite(v) for v in values):
                raise loc.error(field.name, message=f"must be a finite number, got {value}")


def _sizes(cfg: NeoXConfig, loc: Locator) -> None:
    for name, limit in SIZE_LIMITS.items():
        value = getattr(cfg.model, name, None)
        if isinstance(value, int) and value > limit:
            raise loc.error(name, message=f"{value} is beyond what can be built here (at most "
                            f"{limit})")


def _optimizer(cfg: NeoXConfig, loc: Locator, purpose: str | None) -> None:
    """The optimizer's parameters as the optimizer will be built with them."""
    if cfg.optim.optimizer is None and purpose != "train":
        return
    from megatron.training.optimizer_params import optimizer_kwargs

    try:
        kwargs = optimizer_kwargs(cfg.optim)
    except ValueError as exc:
        raise loc.error("optimizer", message=str(exc).removeprefix("optimizer.")) from None
    for name, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(_non_finite(v) for v in values):
            raise loc.error("optimizer", message=f"params.{name}: must be finite, got {value}")
    for name in ("lr", "eps", "weight_decay"):
        value = kwargs.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise loc.error("optimizer", message=f"params.{name} must be a number, got "
                            f"{value!r}")
    where = "lr" if "lr" in loc.merged.sources else "optimizer"
    if kwargs.get("lr", 0.0) < 0:
        raise loc.error(where, message=f"the learning rate must not be negative, got "
                        f"{kwargs['lr']}")
    if kwargs.get("eps", 0.0) < 0:
        raise loc.error("optimizer", message=f"params.eps must not be negative, got "
                        f"{kwargs['eps']}")
    if kwargs.get("weight_decay", 0.0) < 0:
        raise loc.error("optimizer", message=f"params.weight_decay must not be negative, got "
                        f"{kwargs['weight_decay']}")
    betas = kwargs.get("betas")
    if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
        raise loc.error("optimizer", message=f"params.betas must be in [0, 1), got "
                        f"{list(betas)}")


def _launcher(cfg: NeoXConfig, loc: Locator) -> None:
    launch = cfg.launcher
    if launch.num_gpus is not None and launch.num_gpus < 1:
        raise loc.error("num_gpus", message=f"must be at least 1, got {launch.num_gpus}")
    if launch.num_nodes is not None and launch.num_nodes != -1 and launch.num_nodes < 1:
        raise loc.error("num_nodes", message=f"must be at least 1 (or -1: all hosts), got "
                        f"{launch.num_nodes}")
    addr = launch.master_addr
    if addr is not None and not _HOST.match(str(addr)):
        raise loc.error("master_addr", message=f"{addr!r} is not a host name or IP address")


def check_values(cfg: NeoXConfig, loc: Locator, purpose: str | None) -> None:
    """Raise ConfigError for a single value that cannot be used, wherever the job runs."""
    _finite_numbers(cfg, loc)
    _sizes(cfg, loc)
    _optimizer(cfg, loc, purpose)
    _launcher(cfg, loc)
