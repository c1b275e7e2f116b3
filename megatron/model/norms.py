"""Normalization layers: LayerNorm, RMSNorm and ScaleNorm.

* LayerNorm (Ba et al.): ``(x - mean) / sqrt(var + eps) * weight + bias`` (``bias`` only with
  ``use_bias_in_norms``), ``layernorm_epsilon``. Always :func:`torch.nn.functional.layer_norm`,
  which is already a fused kernel; ``layernorm_fusion`` changes nothing.
* RMSNorm (Zhang & Sennrich): ``x / sqrt(mean(x^2) + eps) * weight`` computed in fp32 and cast
  back before the weight, as Llama does (``eps`` inside the square root),
  ``rms_norm_epsilon``. ``rmsnorm_fusion`` uses :func:`torch.nn.functional.rms_norm` (one
  fused kernel on GPUs) instead of the written-out formula.
* ScaleNorm (Nguyen & Salazar): ``x / max(||x||, eps) * g`` with one learned scalar ``g``
  (initialized to 1, as in GPT-NeoX), ``scalenorm_epsilon``.

Norm parameters are replicated over tensor-parallel ranks (``partition_dim`` -1).
A norm applied to tensor-parallel shards of a tensor (the per-head query/key norms) is built
with ``grad_sum_group``: its replicated parameters then enter the forward through
:func:`~megatron.parallel.mappings.copy_to_tp_region`, so backward sums their gradient over the
group and every rank holds the full gradient. A norm applied to a sequence-parallel tensor is
built with ``sequence_parallel=True``: its parameters are marked for the gradient all-reduce
over the tensor-parallel group (:func:`megatron.parallel.allreduce_sequence_parallel_grads`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs
from megatron.parallel.layers import set_tensor_parallel_attributes
from megatron.parallel.mappings import copy_to_tp_region


class _Norm(nn.Module):
    def __init__(self, grad_sum_group: Any = None) -> None:
        super().__init__()
        self.grad_sum_group = grad_sum_group

    def _replicated(self) -> None:
        """Record that every rank holds the whole of each parameter (see
        :mod:`megatron.parallel.layers`)."""
        for p in self.parameters():
            set_tensor_parallel_attributes(p, False)

    def _mark(self, sequence_parallel: bool) -> None:
        if sequence_parallel:
            mark_sequence_parallel(self)

    def _param(self, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or self.grad_sum_group is None:
            return p
        return copy_to_tp_region(p, self.grad_sum_group)


class LayerNorm(_Norm):
    def __init__(
        self, dim: int, eps: float, *, bias: bool = True, grad_sum_group: Any = None,
        sequence_parallel: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(grad_sum_group)
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self._replicated()
        self._mark(sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self._param(self.weight), self._param(self.bias),
                            self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(_Norm):
    def __init__(
        self, dim: int, eps: float, *, fused: bool = False, grad_sum_group: Any = None,
        sequence_parallel: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(grad_sum_group)
        self.dim = dim
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(dim))
        self._replicated()
        self._mark(sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._param(self.weight)
        assert weight is not None
        if self.fused:
            return F.rms_norm(x, (self.dim,), weight, self.eps)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, fused={self.fused}"


class ScaleNorm(_Norm):
    def __init__(
        self, dim: int, eps: float, *, grad_sum_group: Any = None, sequence_parallel: bool = False
    ) -> None:
        super().__init__(grad_sum_group)
        self.dim = dim
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))
        self._replicated()
        self._mark(sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=self.eps)
        return x / norm * self._param(self.g)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def norm_spec(
    model: ModelArgs, dim: int, *, grad_sum_group: Any = None, sequence_parallel: bool = False
) -> tuple[type[nn.Module], dict[str, Any]]:
    """``(class, keyword arguments)`` of the norm selected by ``model.norm`` over the last
    dimension of size ``dim`` (the pipeline builds the final norm from this spec)."""
    common: dict[str, Any] = {"dim": dim, "grad_sum_group": grad_sum_group,
                              "sequence_parallel": sequence_parallel}
    if model.norm == "layernorm":
        return LayerNorm, {**common, "eps": model.layernorm_epsilon,
                           "bias": model.use_bias_in_norms}
    if model.norm == "rmsnorm":
        return RMSNorm, {**common, "eps": model.rms_norm_epsilon, "fused": model.rmsnorm_fusion}
    if model.norm == "scalenorm":
        return ScaleNorm, {**common, "eps": model.scalenorm_epsilon}
    raise ValueError(f"unknown norm {model.norm!r}")


def build_norm(
    model: ModelArgs, dim: int, *, grad_sum_group: Any = None, sequence_parallel: bool = False
) -> nn.Module:
    """The norm selected by ``model.norm`` over the last dimension of size ``dim``."""
    cls, kwargs = norm_spec(model, dim, grad_sum_group=grad_sum_group,
                            sequence_parallel=sequence_parallel)
    return cls(**kwargs)


def norm_parameter_count(model: ModelArgs, dim: int) -> int:
    """Parameters of one :func:`build_norm` norm over ``dim`` features."""
    if model.norm == "scalenorm":
        return 1
    if model.norm == "layernorm" and model.use_bias_in_norms:
        return 2 * dim
    return dim


def mark_sequence_parallel(module: nn.Module) -> None:
    """Flag ``module``'s parameters as used on sequence-parallel activations: each rank's
    gradient is partial and is summed over the tensor-parallel group during backward
    (:func:`megatron.parallel.register_sequence_parallel_grad_hooks`)."""
    for p in module.parameters():
        p.sequence_parallel = True  # type: ignore[attr-defined]
