"""GPT-NeoX's flat shortcuts for two DeepSpeed blocks, folded into those blocks.

* ZeRO: ``zero_stage``, ``zero_reduce_scatter``, ``zero_contiguous_gradients``,
  ``zero_reduce_bucket_size`` and ``zero_allgather_bucket_size`` are the ``zero_optimization``
  block's ``stage``, ``reduce_scatter``, ``contiguous_gradients``, ``reduce_bucket_size`` and
  ``allgather_bucket_size``.
* fp16 loss scaling: ``loss_scale``, ``loss_scale_window``, ``hysteresis`` and ``min_scale``
  are the ``fp16`` block's ``loss_scale``, ``loss_scale_window``, ``hysteresis`` and
  ``min_loss_scale``; ``dynamic_loss_scale`` chooses between dynamic (``loss_scale`` 0) and
  static scaling.

Precedence follows GPT-NeoX, where the block is what reaches DeepSpeed and the flat keys are
read back from it: a key the block sets wins over its shortcut (a differing shortcut is named
in a warning). A shortcut fills in what the block leaves out (GPT-NeoX drops it there, the
one case where this differs: a shortcut here never goes unused). After resolution the ZeRO
shortcuts and ``dynamic_loss_scale`` hold the values in effect, as GPT-NeoX's do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.neox_arguments.resolve import Locator

# shortcut -> key of the zero_optimization block, with DeepSpeed's default
ZERO_SHORTCUTS: dict[str, tuple[str, Any]] = {
    "zero_stage": ("stage", 0),
    "zero_reduce_scatter": ("reduce_scatter", True),
    "zero_contiguous_gradients": ("contiguous_gradients", True),
    "zero_reduce_bucket_size": ("reduce_bucket_size", 500_000_000),
    "zero_allgather_bucket_size": ("allgather_bucket_size", 500_000_000),
}

# shortcut -> key of the fp16 block
LOSS_SCALE_SHORTCUTS: dict[str, str] = {
    "loss_scale": "loss_scale",
    "loss_scale_window": "loss_scale_window",
    "hysteresis": "hysteresis",
    "min_scale": "min_loss_scale",
}


def _number(value: Any) -> Any:
    """Whole floats as ints (DeepSpeed counts steps in ints)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _fold(block: dict[str, Any], name: str, block_key: str, value: Any, block_name: str,
          warnings: list[str]) -> None:
    if block_key in block:
        if block[block_key] != value:
            warnings.append(f"{name}: {value!r} is overridden by {block_name}.{block_key}: "
                            f"{block[block_key]!r} (the block wins, as in GPT-NeoX)")
        return
    block[block_key] = value


def fold_zero_shortcuts(values: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """Write the ZeRO shortcuts the user set into ``values['zero_optimization']``; returns the
    shortcuts' resolved values (the block's, or DeepSpeed's defaults)."""
    given = {n: values[n] for n in ZERO_SHORTCUTS if values.get(n) is not None}
    block = values.get("zero_optimization")
    if given:
        block = dict(block or {})
        for name, value in given.items():
            _fold(block, name, ZERO_SHORTCUTS[name][0], value, "zero_optimization", warnings)
        values["zero_optimization"] = block
    block = block or {}
    return {name: block.get(key, default) for name, (key, default) in ZERO_SHORTCUTS.items()}


def fold_loss_scale_shortcuts(values: dict[str, Any], precision: str, loc: Locator,
                              warnings: list[str]) -> dict[str, Any]:
    """Write the loss-scale shortcuts the user set into ``values['fp16']`` (fp16 runs only);
    returns the resolved ``dynamic_loss_scale``."""
    given = [n for n in (*LOSS_SCALE_SHORTCUTS, "dynamic_loss_scale") if n in values
             and values[n] is not None]
    loss_scale = values.get("loss_scale")
    if loss_scale is not None and loss_scale < 0:
        raise loc.error("loss_scale", message=f"must be 0 (dynamic) or positive, got {loss_scale}")
    for name, low in (("loss_scale_window", 1), ("hysteresis", 1), ("min_scale", 0)):
        value = values.get(name)
        if value is not None and (value < low or (low == 0 and value == 0)):
            bound = "positive" if low == 0 else f"at least {low}"
            raise loc.error(name, message=f"must be {bound}, got {value}")
    if precision != "fp16":
        if given:
            warnings.append(f"{', '.join(given)}: fp16 loss scaling only; precision is "
                            f"{precision}, so they have no effect")
        return {"dynamic_loss_scale": values.get("dynamic_loss_scale")}
    block = dict(values.get("fp16") or {})
    dynamic = values.get("dynamic_loss_scale")
    if dynamic is True and loss_scale:
        raise loc.error("dynamic_loss_scale", "loss_scale", message=(
            f"dynamic_loss_scale: true conflicts with the static loss_scale {loss_scale}; "
            "set one of them"))
    if dynamic is True and loss_scale is None:
        loss_scale = 0  # DeepSpeed's spelling of dynamic
    for name, block_key in LOSS_SCALE_SHORTCUTS.items():
        value = loss_scale if name == "loss_scale" else values.get(name)
        if value is not None and (name in given or name == "loss_scale"):
            _fold(block, name, block_key, _number(value), "fp16", warnings)
    if dynamic is False and not block.get("loss_scale"):
        raise loc.error("dynamic_loss_scale", message=(
            "false (static loss scaling) needs a positive loss_scale (or fp16.loss_scale)"))
    if given:
        values["fp16"] = block
    return {"dynamic_loss_scale": not block.get("loss_scale")}
