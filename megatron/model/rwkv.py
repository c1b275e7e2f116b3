"""The RWKV-6 layer (GPT-NeoX's ``rwkv`` layer type): time mix, then channel mix::

    x = ln1(x)                         (first layer only, as GPT-NeoX does)
    x = x + time_mix(ln1(x))
    x = x + channel_mix(ln2(x))

Both mixes shift the sequence by one token (``prev_t = x_{t-1}``, zeros before the first) and
interpolate between the token and its predecessor with learned (time mix: data-dependent)
ratios. The time mix computes receptance, key, value and gate projections of width
``dim_att`` split into ``dim_att / head_size`` heads, a per-token decay
``exp(-exp(time_decay + lora(x)))``, runs the WKV-6 recurrence
(:func:`~megatron.model.ssm_scan.wkv6_chunked`), normalizes every head (group norm), multiplies
by ``silu(gate)`` and projects back. The channel mix is ``sigmoid(r) * value(relu(key)^2)`` with
width ``ffn_dim``. The norms are LayerNorms whatever ``norm`` says (as in GPT-NeoX).

Keys (GPT-NeoX's): ``dim_att`` (default ``hidden_size``), ``head_size`` (``dim_att /
num_attention_heads``), ``ffn_dim`` (``intermediate_size``, else ``expansion_factor`` (3.5) x
hidden, rounded down to a multiple of 32). The initializations follow GPT-NeoX's RWKV-6 layer.
Tensor parallelism is not supported (refused by the config checks, as GPT-NeoX does not
support it either). With a generation cache the layer keeps each mix's last input and the WKV
state per head in the cache's slot.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs, rwkv_dims
from megatron.model.layout import Activations
from megatron.model.mamba import layer_state
from megatron.model.ssm_scan import wkv6_chunked
from megatron.parallel.layers import set_tensor_parallel_attributes

MIX_LORA = 32
DECAY_LORA = 64
WKV_CHUNK = 16


def _shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """``x [b, l, c]`` moved one token later, ``prev [b, c]`` (or zeros) in front."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def _ratio_ramp(hidden: int) -> torch.Tensor:
    return (torch.arange(hidden, dtype=torch.float32) / hidden).view(1, 1, hidden)


class TimeMix(nn.Module):
    def __init__(self, model: ModelArgs, layer: int) -> None:
        super().__init__()
        assert model.hidden_size is not None and model.num_layers is not None
        hidden, layers = model.hidden_size, model.num_layers
        dim_att, self.head_size, _ = rwkv_dims(model)
        self.heads = dim_att // self.head_size
        to_one = layer / max(layers - 1, 1)
        to_zero = 1.0 - layer / layers
        ramp = _ratio_ramp(hidden)
        with torch.no_grad():
            base = 1.0 - ramp.pow(to_zero)
            self.time_maa_x = nn.Parameter(base.clone())
            self.time_maa_w = nn.Parameter(base.clone())
            self.time_maa_k = nn.Parameter(base.clone())
            self.time_maa_v = nn.Parameter(1.0 - (ramp.pow(to_zero) + 0.3 * to_one))
            self.time_maa_r = nn.Parameter(1.0 - ramp.pow(0.5 * to_zero))
            self.time_maa_g = nn.Parameter(1.0 - ramp.pow(0.5 * to_zero))
            self.time_maa_w1 = nn.Parameter(torch.empty(hidden, MIX_LORA * 5).uniform_(-1e-4, 1e-4))
            self.time_maa_w2 = nn.Parameter(
                torch.empty(5, MIX_LORA, hidden).uniform_(-1e-4, 1e-4))
            n = torch.arange(dim_att, dtype=torch.float32)
            span = max(dim_att - 1, 1)
            speed = -6 + 5 * (n / span).pow(0.7 + 1.3 * to_one)
            self.time_decay = nn.Parameter(speed.view(1, 1, dim_att))
            self.time_decay_w1 = nn.Parameter(
                torch.empty(hidden, DECAY_LORA).uniform_(-1e-4, 1e-4))
            self.time_decay_w2 = nn.Parameter(
                torch.empty(DECAY_LORA, dim_att).uniform_(-1e-4, 1e-4))
            zigzag = ((n + 1) % 3 - 1) * 0.1
            bonus = to_one * (1 - n / span) + zigzag
            self.time_faaaa = nn.Parameter(bonus.view(self.heads, self.head_size))
        self.receptance = nn.Linear(hidden, dim_att, bias=False)
        self.key = nn.Linear(hidden, dim_att, bias=False)
        self.value = nn.Linear(hidden, dim_att, bias=False)
        self.output = nn.Linear(dim_att, hidden, bias=False)
        self.gate = nn.Linear(hidden, dim_att, bias=False)
        self.ln_x = nn.GroupNorm(self.heads, dim_att, eps=1e-5 * 64)

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None) -> torch.Tensor:
        """``x [b, l, hidden]`` (already normalized)."""
        b, length, hidden = x.shape
        prev = None if cache is None else cache.get("att_x")
        xx = _shift(x, prev) - x
        xxx = x + xx * self.time_maa_x
        lora = torch.tanh(xxx @ self.time_maa_w1).view(b * length, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(lora, self.time_maa_w2).view(5, b, length, -1).unbind(0)
        r = self.receptance(x + xx * (self.time_maa_r + mr))
        k = self.key(x + xx * (self.time_maa_k + mk))
        v = self.value(x + xx * (self.time_maa_v + mv))
        g = F.silu(self.gate(x + xx * (self.time_maa_g + mg)))
        xw = x + xx * (self.time_maa_w + mw)
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, self.head_size).transpose(1, 2)

        state = None if cache is None else cache.get("wkv")
        y, state = wkv6_chunked(heads(r), heads(k), heads(v), heads(w), self.time_faaaa,
                                state=state, chunk=WKV_CHUNK)
        if cache is not None:
            cache["att_x"], cache["wkv"] = x[:, -1].detach(), state.detach()
        y = y.transpose(1, 2).reshape(b * length, -1).to(x.dtype)
        y = self.ln_x(y).view(b, length, -1)
        return self.output(y * g)


class ChannelMix(nn.Module):
    def __init__(self, model: ModelArgs, layer: int) -> None:
        super().__init__()
        assert model.hidden_size is not None and model.num_layers is not None
        hidden = model.hidden_size
        _, _, ffn = rwkv_dims(model)
        with torch.no_grad():
            base = 1.0 - _ratio_ramp(hidden).pow(1.0 - layer / model.num_layers)
            self.time_maa_k = nn.Parameter(base.clone())
            self.time_maa_r = nn.Parameter(base.clone())
        self.key = nn.Linear(hidden, ffn, bias=False)
        self.receptance = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None) -> torch.Tensor:
        prev = None if cache is None else cache.get("ffn_x")
        xx = _shift(x, prev) - x
        if cache is not None:
            cache["ffn_x"] = x[:, -1].detach()
        k = torch.relu(self.key(x + xx * self.time_maa_k)).square()
        return torch.sigmoid(self.receptance(x + xx * self.time_maa_r)) * self.value(k)


class RWKVLayer(nn.Module):
    """One RWKV-6 layer as a block (hidden states ``[s, b, h]`` in and out)."""

    def __init__(self, model: ModelArgs, *, layer_number: int = 1, **_: Any) -> None:
        super().__init__()
        assert model.hidden_size is not None
        self.layer_number = layer_number
        layer = layer_number - 1  # GPT-NeoX counts RWKV layers from 0
        self.first = layer == 0
        self.ln1 = nn.LayerNorm(model.hidden_size)
        self.ln2 = nn.LayerNorm(model.hidden_size)
        self.att = TimeMix(model, layer)
        self.ffn = ChannelMix(model, layer)
        self.drop_att = model.attention_dropout
        self.drop_ffn = model.hidden_dropout
        for p in self.parameters():
            set_tensor_parallel_attributes(p, False)

    def forward(self, act: Activations, *, layer_number: int | None = None,
                attention_type: str | None = None) -> Activations:
        number = self.layer_number if layer_number is None else layer_number
        cache = layer_state(act, number)
        x = act.x.transpose(0, 1)  # [b, s, h]
        if self.first:
            x = self.ln1(x)
        x = F.dropout(x + self.att(self.ln1(x), cache), self.drop_att, self.training)
        x = F.dropout(x + self.ffn(self.ln2(x), cache), self.drop_ffn, self.training)
        return act.with_x(x.transpose(0, 1))
