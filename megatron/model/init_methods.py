"""Weight initializations selected by ``init_method`` / ``output_layer_init_method``.

Each function returned here fills a tensor in place from the current torch RNG. The parallel
layers call it once on the *full* (master) weight and keep their slice, so the result does not
depend on the tensor-parallel size.

======================================  ==================================================
name                                    distribution
======================================  ==================================================
``normal``                              N(0, std)
``scaled_normal``                       N(0, std / sqrt(2 * num_layers))
``single_residual_scaled_normal``       N(0, std / sqrt(num_layers))
``small_init``                          N(0, sqrt(2 / (5 * hidden)))   (Nguyen & Salazar)
``wang_init``                           N(0, 2 / (num_layers * sqrt(hidden)))
``xavier_uniform`` / ``xavier_normal``  Glorot & Bengio, gain 1
``orthogonal``                          (semi-)orthogonal, gain sqrt(2)
``scaled_orthogonal``                   (semi-)orthogonal, gain sqrt(2 / num_layers)
======================================  ==================================================

``std`` is ``init_method_std``. The orthogonal gains follow GPT-NeoX.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from megatron.model.args import ModelArgs

InitFn = Callable[[torch.Tensor], torch.Tensor]


def _normal(std: float) -> InitFn:
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def _orthogonal(gain: float) -> InitFn:
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.orthogonal_(tensor, gain=gain)

    return init


def init_method(name: str, *, std: float, num_layers: int, hidden_size: int) -> InitFn:
    """The in-place init function called ``name`` (see the module docstring)."""
    if name == "normal":
        return _normal(std)
    if name == "scaled_normal":
        return _normal(std / math.sqrt(2.0 * num_layers))
    if name == "single_residual_scaled_normal":
        return _normal(std / math.sqrt(num_layers))
    if name == "small_init":
        return _normal(math.sqrt(2.0 / (5.0 * hidden_size)))
    if name == "wang_init":
        return _normal(2.0 / (num_layers * math.sqrt(hidden_size)))
    if name == "xavier_uniform":
        return nn.init.xavier_uniform_
    if name == "xavier_normal":
        return nn.init.xavier_normal_
    if name == "orthogonal":
        return _orthogonal(math.sqrt(2.0))
    if name == "scaled_orthogonal":
        return _orthogonal(math.sqrt(2.0 / num_layers))
    raise ValueError(f"unknown init method {name!r}")


def model_init_methods(model: ModelArgs) -> tuple[InitFn, InitFn]:
    """``(input-side init, output-side init)`` of a model config.

    The output-side init is used by the layers that write into the residual stream (attention
    output projection and MLP down projection); everything else uses the input-side one.
    """
    assert model.num_layers is not None and model.hidden_size is not None
    common = {
        "std": model.init_method_std,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
    }
    return (
        init_method(model.init_method, **common),
        init_method(model.output_layer_init_method, **common),
    )
