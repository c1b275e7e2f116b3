"""MLP activations.

Plain: ``gelu`` (exact, erf-based; ``openai_gelu``, and in the dense MLP ``bias_gelu_fusion``
as in GPT-NeoX, select the tanh approximation), ``relu``,
``silu`` / ``swish``, ``mish``, ``softsign``.

Gated (Shazeer, "GLU Variants Improve Transformer"): the first projection produces two halves
``[up; gate]`` (GPT-NeoX's order) and the MLP computes ``act(gate) * up`` with ``act`` = GeLU
(``geglu``), SiLU (``swiglu``), ReLU (``reglu``), identity (``bilinear``) or sigmoid (``glu``).
:func:`fuse_gated` / :func:`split_gated` convert between the fused weight (or bias) and its
two halves, for checkpoint conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megatron.model.args import GATED_ACTIVATIONS

Activation = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu(approximate: bool) -> Activation:
    mode = "tanh" if approximate else "none"

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=mode)

    return gelu


def tanh_gelu(model: Any) -> bool:
    """Whether the dense MLP's GeLU is the tanh approximation: ``openai_gelu``, or
    ``bias_gelu_fusion`` with a plain GeLU (GPT-NeoX's fused bias-GeLU kernel computes the tanh
    approximation, so models trained with the flag learned that function)."""
    return bool(model.openai_gelu or (model.bias_gelu_fusion and model.activation == "gelu"))


def is_gated(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


def gated_activation(h: torch.Tensor, act: Activation) -> torch.Tensor:
    """``act(gate) * up`` for ``h = [up; gate]`` along the last dimension."""
    up, gate = h.chunk(2, dim=-1)
    return act(gate) * up


def fuse_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The dense MLP's fused first-projection weight (or bias) from its halves (rows)."""
    return torch.cat([up, gate], dim=0)


def split_gated(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate, up)`` halves (rows) of the dense MLP's fused first-projection weight or bias."""
    up, gate = fused.chunk(2, dim=0)
    return gate, up


def activation_function(activation: str, *, openai_gelu: bool = False) -> Activation:
    """The elementwise function of ``activation``; for gated activations, the function
    applied to the gate half."""
    gelu = _gelu(openai_gelu)
    table: dict[str, Activation] = {
        "gelu": gelu,
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
        "mish": F.mish,
        "softsign": F.softsign,
        "geglu": gelu,
        "swiglu": F.silu,
        "reglu": F.relu,
        "bilinear": _identity,
        "glu": torch.sigmoid,
    }
    if activation not in table:
        raise ValueError(f"unknown activation {activation!r}")
    return table[activation]
