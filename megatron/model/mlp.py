"""The transformer MLP: up projection, activation, down projection.

Width ``ffn`` from :func:`~megatron.model.args.mlp_width` (per half for gated
activations). Gated activations use one fused first projection in GPT-NeoX's layout: its full
weight is ``[up; gate]`` (``2 * ffn`` rows; Hugging Face Llama's ``up_proj`` then
``gate_proj``) and the MLP computes ``act(gate) * up``
(:func:`~megatron.model.activations.gated_activation`). It is split with
``partition_stride=2``, so tensor-parallel rank ``r`` holds ``[up_r; gate_r]``, as each rank of
a GPT-NeoX model does.

``bias_gelu_fusion`` (plain GeLU only) adds the up-projection bias inside the activation call
instead of inside the linear layer and, as GPT-NeoX's fused bias-GeLU kernel does, uses the tanh
approximation of GeLU (:func:`~megatron.model.activations.tanh_gelu`); ``bias_dropout_fusion``
hands the down-projection bias to the caller, which adds it together with dropout and the
residual (the same numbers).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.model.activations import (
    activation_function,
    gated_activation,
    is_gated,
    tanh_gelu,
)
from megatron.model.args import ModelArgs, mlp_bias, mlp_width
from megatron.model.init_methods import InitFn
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.parallel.state import ParallelState


class MLP(nn.Module):
    def __init__(
        self,
        model: ModelArgs,
        *,
        state: ParallelState,
        sequence_parallel: bool,
        init_method: InitFn,
        output_init_method: InitFn,
    ) -> None:
        super().__init__()
        assert model.hidden_size is not None
        hidden = model.hidden_size
        self.ffn = mlp_width(model, model.activation)
        self.gated = is_gated(model.activation)
        self.act = activation_function(model.activation, openai_gelu=tanh_gelu(model))
        self.bias_in_activation = (
            model.bias_gelu_fusion and model.activation == "gelu" and mlp_bias(model)
        )
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden, self.ffn * (2 if self.gated else 1), state=state, bias=mlp_bias(model),
            init_method=init_method, sequence_parallel_input=sequence_parallel,
            partition_stride=2 if self.gated else 1, skip_bias_add=self.bias_in_activation,
        )  # fmt: skip
        self.dense_4h_to_h = RowParallelLinear(
            self.ffn, hidden, state=state, bias=mlp_bias(model),
            init_method=output_init_method, sequence_parallel_output=sequence_parallel,
            skip_bias_add=model.bias_dropout_fusion,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [s, b, h]`` -> ``(output [s, b, h], bias to add or None)``."""
        h = self.dense_h_to_4h(x)
        if self.gated:
            h = gated_activation(h, self.act)
        elif self.bias_in_activation:
            bias = self.dense_h_to_4h.output_bias
            assert bias is not None
            h = self.act(h + bias)
        else:
            h = self.act(h)
        return self.dense_4h_to_h(h), self.dense_4h_to_h.output_bias
