"""The mixture-of-experts MLP block: a router and ``E`` expert MLPs, used in place of the dense
MLP in every ``moe_expert_interval``-th transformer layer.

One forward pass over this rank's tokens ``x [s, b, h]`` (``T = s * b`` tokens):

1. the :class:`~megatron.model.router.Router` picks ``k`` experts and weights per token;
2. the ``T * k`` assignments are sorted by expert (stable, so tokens keep their order inside
   an expert); with ``moe_token_dropping`` every expert keeps only its first ``capacity``
   assignments (the rest are dropped: their expert output counts as zero), otherwise no token
   is dropped;
3. with expert parallelism (``expert_model_parallel_size`` > 1) each rank holds ``E / ep``
   experts; the sorted tokens go to the rank of their expert and come back through
   ``all_to_all_single`` over the expert-parallel group (:mod:`megatron.parallel.experts`);
4. the experts run as grouped matmuls (:func:`grouped_mm`: one matmul per expert, or
   ``torch._grouped_mm`` with ``moe_grouped_gemm`` where the device has it);
5. the outputs, weighted by the router, are summed back into each token's row.

Expert weights: ``w_in [E_local, ffn (x2 when gated), h]`` (``[gate; up]`` halves for gated
activations, the order of Hugging Face's fused expert ``gate_up_proj``, unlike the dense MLP's
GPT-NeoX order ``[up; gate]``) and ``w_out [E_local, h, ffn]``. With
``enable_expert_tensor_parallelism`` (GPT-NeoX's switch) they are split over the
tensor-parallel group like the dense MLP (``ffn / tp``, ``w_in`` with stride 2) and the partial
outputs are summed over that group; by default (GPT-NeoX's too) every tensor-parallel rank
holds its experts whole and computes them on all of its tokens, with no tensor-parallel
communication. Every expert's weight is drawn in expert order from the same RNG and each rank
keeps its own, so neither the tensor- nor the expert-parallel size changes the initial model.
Experts have no biases.

Under expert parallelism each rank creates and stores only its ``E_local = E / ep`` experts
(experts ``ep_rank * E_local`` onwards). Their gradients are reduced over the
expert-data-parallel group, the data-parallel ranks holding the same experts, through
DeepSpeed's MoE support (:mod:`megatron.parallel.experts`); ZeRO 1/2 partition their optimizer
state over that group. Without expert parallelism nothing differs from a dense parameter.

The router's auxiliary losses enter the training loss through the gradient only
(:class:`_AttachAuxLoss`): the block's output is unchanged, and backward adds
``scale * d(aux)/d(params)``, where ``scale`` is what the engine multiplies the language-model
loss by before backward (1 / gradient accumulation steps, times the fp16 loss scale;
:func:`set_aux_loss_scale`). This works the same in the plain model and in every pipeline
stage. The logged language-model loss stays the plain cross entropy; the auxiliary losses and
the routing statistics are kept per block (:class:`MoEStats`) and read by the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megatron.model.activations import activation_function, is_gated
from megatron.model.args import ModelArgs, moe_expert_width
from megatron.model.init_methods import InitFn
from megatron.model.router import Router
from megatron.parallel.experts import (
    ExpertExchange,
    deepspeed_expert_marker,
    mark_expert_parameters,
    register_expert_groups,
)
from megatron.parallel.layers import master_weight, set_tensor_parallel_attributes, split_tensor
from megatron.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    reduce_from_tp_region,
    scatter_to_sequence_parallel_region,
)
from megatron.parallel.state import ParallelState


# ------------------------------------------------------------------ grouped matmul
def _grouped_mm_available(x: torch.Tensor) -> bool:
    return (hasattr(torch, "_grouped_mm") and x.device.type == "cuda"
            and x.dtype == torch.bfloat16)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: list[int], *,
               fused: bool = False) -> torch.Tensor:
    """Rows of ``x [N, in]``, grouped by expert (``counts[e]`` consecutive rows for expert
    ``e``), times ``weight[e]^T`` (``weight [E, out, in]``) -> ``[N, out]``.

    The default path is one matmul per expert; ``fused`` uses ``torch._grouped_mm`` where the
    device and dtype allow it (recent NVIDIA GPUs, bf16) and falls back otherwise."""
    if fused and _grouped_mm_available(x):
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    pieces = x.split(counts, dim=0)
    out = [piece @ weight[e].t() for e, piece in enumerate(pieces)]
    if not out:
        return x.new_zeros((0, weight.shape[1]))
    return torch.cat(out, dim=0)


# -------------------------------------------------------------------- aux losses
class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; backward also sends ``scale`` as the gradient of ``aux``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        aux_grad = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


@dataclass
class MoEStats:
    """Routing statistics of one MoE block, summed over the forward passes since the last
    :meth:`reset` (a recomputed forward adds an identical pass, so means are unaffected)."""

    passes: int = 0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    dropped: int = 0
    tokens_per_expert: list[int] = field(default_factory=list)
    _pending: list[torch.Tensor] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        self.passes, self.aux_loss, self.z_loss, self.dropped = 0, 0.0, 0.0, 0
        self.tokens_per_expert = []
        self._pending = []

    def note(self, aux: torch.Tensor, z: torch.Tensor, counts: torch.Tensor,
             dropped: torch.Tensor) -> None:
        """Keep one pass's values (as tensors: read without a host sync per pass)."""
        self._pending.append(torch.cat([
            aux.detach().float().reshape(1), z.detach().float().reshape(1),
            dropped.detach().float().reshape(1), counts.detach().float(),
        ]))  # fmt: skip

    def totals(self) -> torch.Tensor | None:
        """``[passes, aux, z, dropped, counts...]`` summed over the pending passes."""
        if not self._pending:
            return None
        stacked = torch.stack(self._pending)
        return torch.cat([stacked.new_tensor([len(self._pending)]), stacked.sum(dim=0)])


# -------------------------------------------------------------------------- block
class MoEMLP(nn.Module):
    """Drop-in replacement of :class:`~megatron.model.mlp.MLP`:
    ``forward(x [s, b, h]) -> (output [s, b, h], None)``."""

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
        experts = model.moe_num_experts
        ep = state.ep_size
        if experts % ep:
            raise ValueError(f"moe_num_experts {experts} is not divisible by "
                             f"expert_model_parallel_size {ep}")
        ffn = moe_expert_width(model)
        # GPT-NeoX's enable_expert_tensor_parallelism: experts split over the tensor-parallel
        # group like the dense MLP, or (the default) whole on every tensor-parallel rank
        self.split_experts = model.enable_expert_tensor_parallelism and state.tp_size > 1
        tp_size = state.tp_size if self.split_experts else 1
        tp_rank = state.tp_rank if self.split_experts else 0
        if ffn % tp_size:
            raise ValueError(f"MoE expert width {ffn} is not divisible by tensor parallel "
                             f"{tp_size}")
        self.state = state
        self.sequence_parallel = sequence_parallel
        self.num_experts = experts
        self.local_experts = experts // ep
        self.first_expert = state.ep_rank * self.local_experts
        self.top_k = model.moe_top_k
        self.gated = is_gated(model.activation)
        self.act = activation_function(model.activation, openai_gelu=model.openai_gelu)
        self.token_dropping = model.moe_token_dropping
        self.train_capacity = model.moe_train_capacity_factor
        self.eval_capacity = model.moe_eval_capacity_factor
        self.min_capacity = model.moe_min_capacity
        self.fused = model.moe_grouped_gemm
        self.aux_loss_scale = 1.0
        self.stats = MoEStats()

        self.router = Router(model, init_method=init_method)
        stride = 2 if self.gated else 1
        w_in, w_out = [], []
        local = range(self.first_expert, self.first_expert + self.local_experts)
        for e in range(experts):  # in expert order: the same weights for any ep / tp
            up = master_weight((ffn * stride, hidden), init_method)
            down = master_weight((hidden, ffn), output_init_method)
            if e in local:
                w_in.append(split_tensor(up, 0, tp_size, tp_rank, stride))
                w_out.append(split_tensor(down, 1, tp_size, tp_rank))
        self.w_in = nn.Parameter(torch.stack(w_in))
        self.w_out = nn.Parameter(torch.stack(w_out))
        if model.enable_expert_tensor_parallelism:
            set_tensor_parallel_attributes(self.w_in, self.split_experts, 1, stride)
            set_tensor_parallel_attributes(self.w_out, self.split_experts, 2)
        else:
            set_tensor_parallel_attributes(self.w_in, False)
            set_tensor_parallel_attributes(self.w_out, False)
        self.exchange = ExpertExchange(state, self.local_experts)
        if ep > 1:  # expert shards: reduced over the expert-data-parallel group
            group_name = register_expert_groups(state)
            mark_expert_parameters([self.w_in, self.w_out], group_name)
            self.deepspeed_moe_marker = deepspeed_expert_marker(experts, ep, group_name)

    # ------------------------------------------------------------------ helpers
    def capacity(self, tokens: int) -> int:
        factor = self.train_capacity if self.training else self.eval_capacity
        return max(self.min_capacity, math.ceil(factor * tokens * self.top_k / self.num_experts))

    def experts_forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by local expert -> expert outputs (partial over tensor parallel when
        the experts are split over it)."""
        if self.split_experts:
            x = copy_to_tp_region(x, self.state.tp_group)
        h = grouped_mm(x, self.w_in.to(x.dtype), counts, fused=self.fused)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return grouped_mm(h, self.w_out.to(x.dtype), counts, fused=self.fused)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        tp_group = self.state.tp_group
        if self.sequence_parallel:
            full = gather_from_sequence_parallel_region(x, tp_group,
                                                        tensor_parallel_output_grad=False)
        else:
            full = x
        s, b, h = full.shape
        tokens = full.reshape(s * b, h)
        routing = self.router(tokens)

        flat = routing.experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = routing.tokens_per_expert
        dropped = counts.new_zeros(())
        if self.token_dropping:
            cap = self.capacity(s * b)
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
            keep = position < cap
            dropped = (~keep).sum()
            order = order[keep]
            counts = counts.clamp(max=cap)
        token_of = order // self.top_k
        weights = routing.weights.reshape(-1)[order]

        expert_in = tokens[token_of]
        received, plan = self.exchange.dispatch(expert_in, counts)
        expert_out = self.experts_forward(received, plan.local_counts)
        if self.split_experts:
            expert_out = reduce_from_tp_region(expert_out, tp_group)
        expert_out = self.exchange.combine(expert_out, plan)

        weighted = expert_out * weights.unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(tokens).index_add(0, token_of, weighted.to(tokens.dtype))
        out = out.reshape(s, b, h)
        if self.sequence_parallel:
            out = scatter_to_sequence_parallel_region(out, tp_group)
        if self.training:
            self.stats.note(routing.aux_loss, routing.z_loss, routing.tokens_per_expert,
                            dropped)
        if self.training and torch.is_grad_enabled():
            aux = routing.aux_loss + routing.z_loss
            if aux.requires_grad:
                out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        return out, None


# --------------------------------------------------------------- model-level access
def moe_blocks(module: nn.Module) -> list[MoEMLP]:
    return [m for m in module.modules() if isinstance(m, MoEMLP)]


def set_aux_loss_scale(module: nn.Module, scale: float) -> None:
    """Set the factor the engine applies to the loss before backward on every MoE block."""
    for block in moe_blocks(module):
        block.aux_loss_scale = scale


def reset_moe_stats(module: nn.Module) -> None:
    for block in moe_blocks(module):
        block.stats.reset()


def collect_moe_metrics(module: nn.Module, state: ParallelState,
                        model: ModelArgs) -> dict[str, float]:
    """The logged routing statistics (see :meth:`~megatron.training.engine.Engine.moe_metrics`)
    from every rank's MoE blocks, reset afterwards. Collective over all ranks when
    ``torch.distributed`` is initialized; tensor-parallel copies are counted once."""
    if model.moe_num_experts <= 1:
        return {}
    width = 4 + model.moe_num_experts
    total = torch.zeros(width, dtype=torch.float64)
    for block in moe_blocks(module):
        sums = block.stats.totals()
        block.stats.reset()
        if sums is not None and state.tp_rank == 0:
            total += sums.to(torch.float64).cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        param = next(module.parameters(), None)
        on_device = total.to(param.device if param is not None else "cpu")
        torch.distributed.all_reduce(on_device)
        total = on_device.cpu()
    passes = float(total[0])
    if passes == 0:
        return {}
    counts = total[4:]
    assignments = float(counts.sum())
    mean = assignments / counts.numel()
    return {
        "moe_aux_loss": float(total[1]) / passes,
        "moe_z_loss": float(total[2]) / passes,
        "moe_tokens_per_expert_min": float(counts.min()) / passes,
        "moe_tokens_per_expert_max": float(counts.max()) / passes,
        "moe_expert_imbalance": float(counts.max()) / mean if mean else 0.0,
        "moe_dropped_fraction": float(total[3]) / assignments if assignments else 0.0,
    }
