"""The Mamba layer (selective state-space model), a drop-in for a transformer layer::

    out = x + mixer(norm(x))

    mixer:  [u; z] = in_proj(h)                      inner width d = expand * hidden
            u = silu(causal_conv(u))                 depthwise, kernel 4
            [dt_low; B; C] = x_proj(u)               dt rank ceil(hidden / 16), state 16
            dt = dt_proj(dt_low)  (its bias is added inside the scan, before softplus)
            y = selective_scan(u, dt, A = -exp(A_log), B, C, D, z)
            out_proj(y)

Sizes and initializations follow GPT-NeoX (and the Mamba reference): ``A_log = log(1..16)`` per
channel, ``D = 1``, ``dt_proj`` uniform in ``+-dt_rank^-0.5`` with its bias the inverse softplus
of a log-uniform step in ``[0.001, 0.1]``, the convolution with PyTorch's default init.
``expansion_factor`` changes the inner width (GPT-NeoX's default 2).

Tensor parallelism splits the inner channels: ``in_proj`` is column parallel (``[u; z]``
halves, stride 2), the convolution, ``dt_proj``, ``A_log`` and ``D`` hold this rank's channels,
``x_proj`` and ``out_proj`` are row parallel (their partial products summed over the group).
Every parameter is drawn at full size and sliced, so the weights do not depend on the
tensor-parallel size. Under sequence parallelism the norm sees this rank's part of the sequence
and ``in_proj`` gathers the whole of it.

The scan is the chunked pure PyTorch one (:mod:`megatron.model.ssm_scan`), or mamba_ssm's and
causal_conv1d's kernels on a GPU when the ``mamba_*_fusion`` keys ask for them and the packages
are importable. With a cache (generation) the layer keeps its convolution inputs and scan state
in the cache's per-layer slot and continues from them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs, mamba_dt_rank, mamba_inner_width
from megatron.model.init_methods import InitFn
from megatron.model.layout import Activations
from megatron.model.norms import build_norm
from megatron.model.ssm_scan import causal_conv, selective_scan_chunked
from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_parallel_attributes,
    split_tensor,
)
from megatron.parallel.mappings import copy_to_tp_region
from megatron.parallel.state import ParallelState

D_STATE = 16
D_CONV = 4
DT_MIN, DT_MAX, DT_FLOOR = 0.001, 0.1, 1e-4
SCAN_CHUNK = 64


@functools.cache
def mamba_kernels_importable() -> bool:
    """Whether mamba_ssm and causal_conv1d can be imported (looked up, not imported)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("mamba_ssm", "causal_conv1d"))


@functools.cache
def _notice_pure_path() -> None:
    print("[mamba] mamba_*_fusion is set but mamba_ssm/causal_conv1d kernels need a GPU with "
          "those packages; using the pure PyTorch scan (same numbers)", file=sys.stderr,
          flush=True)


def _fusion_requested(model: ModelArgs) -> bool:
    return (model.mamba_selective_scan_fusion or model.mamba_causal_conv_fusion
            or model.mamba_inner_func_fusion)


def _local_param(full: torch.Tensor, state: ParallelState, dim: int = 0) -> nn.Parameter:
    """This rank's slice of a parameter drawn at full size, with its split recorded."""
    shard = split_tensor(full, dim, state.tp_size, state.tp_rank)
    param = nn.Parameter(shard.contiguous())
    set_tensor_parallel_attributes(param, state.tp_size > 1, dim, 1)
    return param


class MambaMixer(nn.Module):
    """The Mamba mixer on ``[s, b, h]`` hidden states (see the module docstring)."""

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
        self.d_inner = mamba_inner_width(model)
        self.dt_rank = mamba_dt_rank(model)
        tp = state.tp_size
        if self.d_inner % tp:
            raise ValueError(f"Mamba inner width {self.d_inner} is not divisible by tensor "
                             f"parallel {tp}")
        self.local = self.d_inner // tp
        self.tp_group = state.tp_group
        bias = model.mamba_use_bias_in_linears
        self.use_kernels = False
        if _fusion_requested(model):
            from megatron.accelerator import is_gpu

            self.use_kernels = is_gpu() and mamba_kernels_importable()
            if not self.use_kernels:
                _notice_pure_path()
        self.in_proj = ColumnParallelLinear(
            hidden, 2 * self.d_inner, state=state, bias=bias, init_method=init_method,
            sequence_parallel_input=sequence_parallel, partition_stride=2,
        )  # fmt: skip
        conv = nn.Conv1d(self.d_inner, self.d_inner, D_CONV, groups=self.d_inner,
                         bias=model.mamba_use_bias_in_conv)
        self.conv_weight = _local_param(conv.weight.data, state)
        self.conv_bias = (_local_param(conv.bias.data, state) if conv.bias is not None
                          else None)
        self.x_proj = RowParallelLinear(
            self.d_inner, self.dt_rank + 2 * D_STATE, state=state, bias=bias,
            init_method=init_method,
        )  # fmt: skip
        std = self.dt_rank ** -0.5
        self.dt_proj = ColumnParallelLinear(
            self.dt_rank, self.d_inner, state=state, bias=True,
            init_method=lambda w: nn.init.uniform_(w, -std, std),
        )  # fmt: skip
        meta = torch.get_default_device().type == "meta"
        if not meta:
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN))
                           + math.log(DT_MIN)).clamp(min=DT_FLOOR)
            inv_softplus = dt + torch.log(-torch.expm1(-dt))
            assert self.dt_proj.bias is not None
            with torch.no_grad():
                self.dt_proj.bias.copy_(split_tensor(inv_softplus, 0, tp, state.tp_rank))
        a = torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = _local_param(torch.log(a), state)
        self.D = _local_param(torch.ones(self.d_inner), state)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = RowParallelLinear(
            self.d_inner, hidden, state=state, bias=bias, init_method=output_init_method,
            sequence_parallel_output=sequence_parallel,
        )  # fmt: skip

    def forward(self, h: torch.Tensor, cache: dict[str, Any] | None = None) -> torch.Tensor:
        """``h [s, b, hidden] -> [s, b, hidden]``. ``cache`` (a dict, possibly empty) holds the
        convolution inputs and scan state of the tokens before ``h`` and receives the new ones."""
        xz = self.in_proj(h).permute(1, 2, 0)  # [b, 2 * local, s]
        u, z = xz.chunk(2, dim=1)
        seq = u.shape[-1]
        cache_in = cache or {}
        if self.use_kernels and cache is None:
            y = self._fused(u, z)
        else:
            u, conv_state = causal_conv(u, self.conv_weight, self.conv_bias,
                                        cache_in.get("conv"))
            u = F.silu(u)
            dt, B, C = self._project(u, seq)
            y, ssm_state = selective_scan_chunked(
                u, dt, -torch.exp(self.A_log.float()), B, C, self.D, z,
                dt_bias=self.dt_proj.bias, state=cache_in.get("ssm"), chunk=SCAN_CHUNK,
            )  # fmt: skip
            if cache is not None:
                cache["conv"], cache["ssm"] = conv_state.detach(), ssm_state.detach()
        return self.out_proj(y.to(h.dtype).permute(2, 0, 1))

    def _project(self, u: torch.Tensor, seq: int) -> tuple[torch.Tensor, ...]:
        """``dt [b, local, s]`` (before its bias), ``B, C [b, 16, s]``."""
        # every rank's channels use all of dt_low, B and C: their gradients are summed
        dbl = copy_to_tp_region(self.x_proj(u.transpose(1, 2)), self.tp_group)  # [b, s, r + 2n]
        dt_low, B, C = torch.split(dbl, [self.dt_rank, D_STATE, D_STATE], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias goes into the scan
        return dt.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)

    def _fused(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        u = causal_conv1d_fn(u.contiguous(), self.conv_weight[:, 0], self.conv_bias,
                             activation="silu")
        dt, B, C = self._project(u, u.shape[-1])
        assert self.dt_proj.bias is not None
        return selective_scan_fn(
            u, dt.contiguous(), -torch.exp(self.A_log.float()), B.contiguous(), C.contiguous(),
            self.D.float(), z=z.contiguous(), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        ).float()  # fmt: skip


class MambaLayer(nn.Module):
    """Pre-norm Mamba block with a residual: ``x + mixer(norm(x))`` (no MLP)."""

    def __init__(
        self,
        model: ModelArgs,
        *,
        state: ParallelState,
        tracker: Any,
        sequence_parallel: bool,
        init_method: InitFn,
        output_init_method: InitFn,
        layer_number: int = 1,
        **_: Any,
    ) -> None:
        super().__init__()
        assert model.hidden_size is not None
        self.layer_number = layer_number
        self.norm = build_norm(model, model.hidden_size, sequence_parallel=sequence_parallel)
        self.mixer = MambaMixer(model, state=state, sequence_parallel=sequence_parallel,
                                init_method=init_method, output_init_method=output_init_method)

    def forward(self, act: Activations, *, layer_number: int | None = None,
                attention_type: str | None = None) -> Activations:
        number = self.layer_number if layer_number is None else layer_number
        cache = layer_state(act, number)
        return act.with_x(act.x + self.mixer(self.norm(act.x), cache))


def layer_state(act: Activations, layer_number: int) -> dict[str, Any] | None:
    """This depth's recurrent-state slot of the generation cache (None without a cache); emptied
    when the cache starts a new sequence."""
    if act.kv_cache is None:
        return None
    slot = act.kv_cache.states[layer_number - 1]
    if act.kv_cache.length == 0:
        slot.clear()
    return slot
