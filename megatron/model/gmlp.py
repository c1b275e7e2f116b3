"""gMLP and aMLP layers (Liu et al., "Pay Attention to MLPs"; GPT-NeoX's ``gmlp`` / ``amlp``
layer types)::

    h = act(input_linear(norm(x)))                  width 2 * ff, ff = expansion_factor x hidden
    [res; gate] = h
    gate = causal_spatial(norm_ff(gate))            W[:s, :s] lower triangle, bias[:s]
    gate = gate + tiny_attention(h)                 aMLP only: one head of width gmlp_attn_dim
    out = output_linear(gate * res)                 no residual, as in GPT-NeoX

``causal_spatial`` mixes positions with a learned ``[seq_length, seq_length]`` matrix (zero
init, bias one, so a new layer starts as a plain gated MLP), masked to earlier positions.
``expansion_factor`` defaults to 4 (GPT-NeoX's fixed ``ff_mult``); ``activation`` is the
config's. As in GPT-NeoX's block, the output replaces the layer's input: there is no residual
connection around the block (the gMLP paper has one), so a GPT-NeoX gMLP config builds the
model it builds there.

Tensor parallelism is refused by the config checks (the gate's norm would see a slice of the
features). The spatial matrix limits sequences to ``seq_length`` tokens. With a generation
cache the layer keeps the activations ``h`` of the earlier tokens and computes the new tokens'
outputs from all of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.activations import activation_function
from megatron.model.args import ModelArgs, gmlp_width
from megatron.model.init_methods import InitFn
from megatron.model.layout import Activations
from megatron.model.mamba import layer_state
from megatron.model.norms import build_norm
from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_parallel_attributes,
)
from megatron.parallel.state import ParallelState


class TinyAttention(nn.Module):
    """One causal softmax-attention head over ``h``, projected to the gate's width."""

    def __init__(self, ff: int, d_attn: int) -> None:
        super().__init__()
        self.proj_qkv = nn.Linear(2 * ff, 3 * d_attn)
        self.proj_ffn = nn.Linear(d_attn, ff)
        self.scale = d_attn ** -0.5

    def forward(self, h: torch.Tensor, new: int) -> torch.Tensor:
        """``h [b, t, 2ff]`` all tokens so far; output for the last ``new`` of them."""
        q, k, v = self.proj_qkv(h).chunk(3, dim=-1)
        q = q[:, q.shape[1] - new:]
        t = k.shape[1]
        scores = torch.einsum("bnd,bmd->bnm", q, k).float() * self.scale
        rows = torch.arange(t - new, t, device=h.device)[:, None]
        scores = scores.masked_fill(torch.arange(t, device=h.device)[None] > rows, float("-inf"))
        return self.proj_ffn(torch.einsum("bnm,bmd->bnd", scores.softmax(-1).to(v.dtype), v))


class GMLPLayer(nn.Module):
    def __init__(
        self,
        model: ModelArgs,
        *,
        state: ParallelState,
        sequence_parallel: bool,
        init_method: InitFn,
        output_init_method: InitFn,
        layer_number: int = 1,
        attention_type: str = "gmlp",
        **_: Any,
    ) -> None:
        super().__init__()
        assert model.hidden_size is not None and model.seq_length is not None
        self.layer_number = layer_number
        ff = gmlp_width(model)
        self.norm = build_norm(model, model.hidden_size)
        self.input_linear = ColumnParallelLinear(
            model.hidden_size, 2 * ff, state=state, init_method=init_method)
        self.act = activation_function(model.activation, openai_gelu=model.openai_gelu)
        self.gate_norm = build_norm(model, ff)
        self.spatial_weight = nn.Parameter(torch.zeros(model.seq_length, model.seq_length))
        self.spatial_bias = nn.Parameter(torch.ones(model.seq_length))
        self.attn = TinyAttention(ff, model.gmlp_attn_dim) if attention_type == "amlp" else None
        self.output_linear = RowParallelLinear(
            ff, model.hidden_size, state=state, init_method=output_init_method)
        for module in (self.attn,):
            if module is not None:
                for p in module.parameters():
                    set_tensor_parallel_attributes(p, False)
        for p in (self.spatial_weight, self.spatial_bias):
            set_tensor_parallel_attributes(p, False)

    def forward(self, act: Activations, *, layer_number: int | None = None,
                attention_type: str | None = None) -> Activations:
        number = self.layer_number if layer_number is None else layer_number
        cache = layer_state(act, number)
        x = act.x
        new = x.shape[0]
        h = self.act(self.input_linear(self.norm(x))).transpose(0, 1)  # [b, new, 2ff]
        if cache is not None:
            if "h" in cache:
                h = torch.cat([cache["h"], h], dim=1)
            cache["h"] = h.detach()
        t = h.shape[1]
        if t > self.spatial_bias.shape[0]:
            raise ValueError(f"gMLP layers see at most seq_length = {self.spatial_bias.shape[0]} "
                             f"tokens, got {t}")
        res, gate = h.chunk(2, dim=-1)
        gate = self.gate_norm(gate)
        weight = self.spatial_weight[t - new:t, :t].tril(t - new)
        spatial = torch.einsum("nm,bmd->bnd", weight.to(gate.dtype), gate)
        spatial = spatial + self.spatial_bias[t - new:t, None].to(gate.dtype)
        if self.attn is not None:
            spatial = spatial + self.attn(h, new)
        out = (spatial * res[:, t - new:]).transpose(0, 1)
        return act.with_x(F.dropout(self.output_linear(out), 0.0, self.training))
