"""GPT-NeoX's ``te_*`` keys: Transformer Engine modules on GPU ranks where the
``transformer_engine`` package is installed (untested here: no GPU with the package was
available; see docs/ssm.md and docs/gpu.md).

* ``te_columnparallel`` / ``te_rowparallel`` -- the local product of every column- / row-parallel
  linear layer of the transformer layers runs through a ``transformer_engine.pytorch.Linear``
  that holds the layer's own weight (so the optimizer, checkpoints and tensor-parallel split are
  unchanged);
* ``te_fp8_mha``, ``te_fp8_format``, ``te_fp8_wgrad``, ``te_fp8_amax_history_len``,
  ``te_fp8_amax_compute_algo``, ``te_fp8_margin`` -- the model's forward runs under
  ``fp8_autocast`` with a delayed-scaling recipe built from these keys (FP8 applies to the
  Transformer Engine linear layers);
* ``te_layernorm_mlp`` / ``te_mha`` -- not mapped: the model keeps its own norm + MLP and
  attention modules, which compute the same functions, and says so in one line.

Without the package the config is refused before launch (the schema), and with it on CPU ranks
too (:func:`megatron.neox_arguments.checks.check_machine`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig


class TELinearMatmul:  # pragma: no cover - needs transformer_engine on a GPU
    """``linear_impl`` of a parallel linear layer computed by a Transformer Engine ``Linear``
    that shares the layer's weight."""

    def __init__(self, layer: nn.Module) -> None:
        import transformer_engine.pytorch as te

        out_features, in_features = layer.weight.shape
        self.te_linear = te.Linear(in_features, out_features, bias=False,
                                   params_dtype=layer.weight.dtype,
                                   device=layer.weight.device)
        del self.te_linear.weight
        self.te_linear.register_parameter("weight", layer.weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        out = self.te_linear(x)
        return out if bias is None else out + bias.to(out.dtype)


def fp8_recipe(cfg: NeoXConfig) -> Any:  # pragma: no cover - needs transformer_engine
    from transformer_engine.common.recipe import DelayedScaling, Format

    p = cfg.precision
    fmt = Format.HYBRID if p.te_fp8_format == "hybrid" else Format.E4M3
    return DelayedScaling(margin=p.te_fp8_margin, fp8_format=fmt,
                          amax_history_len=p.te_fp8_amax_history_len,
                          amax_compute_algo=p.te_fp8_amax_compute_algo)


def te_requested(cfg: NeoXConfig) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cfg.precision)
            if f.name.startswith("te_") and getattr(cfg.precision, f.name) != f.default]


def apply_transformer_engine(model: nn.Module, cfg: NeoXConfig) -> dict[str, Any]:
    """What the ``te_*`` keys ask for, done to ``model`` in place (no-op when none is set)."""
    keys = te_requested(cfg)
    if not keys:
        return {}
    p = cfg.precision  # pragma: no cover - below needs transformer_engine on a GPU
    kinds = tuple(k for k, on in ((ColumnParallelLinear, p.te_columnparallel),
                                  (RowParallelLinear, p.te_rowparallel)) if on)
    swapped = 0
    for module in model.modules():
        if kinds and isinstance(module, kinds):
            module.linear_impl = TELinearMatmul(module)
            swapped += 1
    if p.te_layernorm_mlp or p.te_mha:
        print("[te] te_layernorm_mlp / te_mha are not mapped: the model's own norm, MLP and "
              "attention modules (the same functions) are used", file=sys.stderr, flush=True)
    fp8 = any(k.startswith("te_fp8") for k in keys)
    if fp8:
        import transformer_engine.pytorch as te

        recipe = fp8_recipe(cfg)
        forward = model.forward

        def fp8_forward(*args: Any, **kwargs: Any) -> Any:
            with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                return forward(*args, **kwargs)

        model.forward = fp8_forward  # type: ignore[method-assign]
    return {"te_linear_layers": swapped, "te_fp8": fp8}
