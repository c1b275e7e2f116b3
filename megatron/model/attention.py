"""Causal self-attention with multi-head or grouped-query heads over tensor-parallel shards.

Activations are ``[seq, batch, hidden]`` (split on ``seq`` with sequence parallelism).

**QKV layout.** One fused :class:`~megatron.parallel.ColumnParallelLinear` produces, for each
key/value head ``g`` in turn, ``[q heads of group g (n_rep * head_dim), k_g (head_dim),
v_g (head_dim)]`` with ``n_rep = num_attention_heads / num_kv_heads``. For multi-head attention
this is exactly the per-head ``[q, k, v]`` layout of Hugging Face GPT-NeoX; a contiguous
tensor-parallel split hands every rank whole groups.

**Kernels.** :func:`torch.nn.functional.scaled_dot_product_attention` (flash attention on CUDA)
runs the plain causal case. The explicit ``softmax(q k^T / sqrt(d) + bias)`` path runs when the
scores need something SDPA cannot express with the same numbers: fp32 softmax
(``attention_softmax_in_fp32``), query-key layer scaling, or -- unless
``scaled_masked_softmax_fusion`` is set or the layer type is ``flash`` -- an additive bias
(ALiBi, T5 buckets), a document mask or a sliding window; with the fusion those go through SDPA
with a float mask. Attention dropout (both paths) runs inside the tracker's model-parallel RNG
fork, so every tensor-parallel rank draws its own mask and recomputation replays it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ATTENTION_TYPES, ModelArgs
from megatron.model.init_methods import InitFn
from megatron.model.norms import build_norm
from megatron.model.positional import (
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    query_key_distance,
)
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState


@dataclass
class AttentionInputs:
    """Per-forward inputs shared by every layer.

    ``attention_mask``: None for plain causal attention, else bool ``[b or 1, 1, q, k]`` with
    True = masked out. ``position_bias``: the T5 bias ``[1, local heads, q, k]`` (or None).
    ``start_pos``: position of the first query (non-zero when decoding with a KV cache).
    """

    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_bias: torch.Tensor | None = None
    start_pos: int = 0


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv, s, d] -> [b, kv * n_rep, s, d]``, head ``g`` repeated ``n_rep`` times."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class SelfAttention(nn.Module):
    def __init__(
        self,
        model: ModelArgs,
        *,
        state: ParallelState,
        tracker: RNGStatesTracker | None,
        sequence_parallel: bool,
        init_method: InitFn,
        output_init_method: InitFn,
        rotary: RotaryEmbedding | None,
    ) -> None:
        super().__init__()
        assert model.hidden_size and model.num_attention_heads
        hidden, heads = model.hidden_size, model.num_attention_heads
        kv_heads = model.num_kv_heads or heads
        tp = state.tp_size
        if hidden % heads or heads % kv_heads or kv_heads % tp:
            raise ValueError(
                f"hidden {hidden}, heads {heads}, kv heads {kv_heads} and tensor parallel {tp} "
                "must divide each other"
            )
        self.head_dim = hidden // heads
        self.n_rep = heads // kv_heads
        self.local_kv_heads = kv_heads // tp
        self.local_heads = heads // tp
        self.tracker = tracker
        self.dropout_p = model.attention_dropout
        self.softmax_in_fp32 = (
            model.attention_softmax_in_fp32 or model.apply_query_key_layer_scaling
        )
        self.query_key_layer_scaling = model.apply_query_key_layer_scaling
        self.masked_softmax_fusion = model.scaled_masked_softmax_fusion
        self.window = model.sliding_window_width
        self.use_alibi = model.pos_emb == "alibi"
        if self.use_alibi:
            first = state.tp_rank * self.local_heads
            self._slopes = alibi_slopes(heads)[first : first + self.local_heads]
        self._slopes_tensor: torch.Tensor | None = None

        self.query_key_value = ColumnParallelLinear(
            hidden, (heads + 2 * kv_heads) * self.head_dim, state=state,
            bias=model.use_bias_in_attn_linear, init_method=init_method,
            sequence_parallel_input=sequence_parallel,
        )  # fmt: skip
        if model.use_qk_layernorm:
            group = state.tp_group if tp > 1 else None
            self.q_norm: nn.Module | None = build_norm(model, self.head_dim, grad_sum_group=group)
            self.k_norm: nn.Module | None = build_norm(model, self.head_dim, grad_sum_group=group)
        else:
            self.q_norm = self.k_norm = None
        self.rotary_emb = rotary
        self.dense = RowParallelLinear(
            heads * self.head_dim, hidden, state=state, bias=model.use_bias_in_attn_linear,
            init_method=output_init_method, sequence_parallel_output=sequence_parallel,
            skip_bias_add=model.bias_dropout_fusion,
        )  # fmt: skip

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _dropout_rng(self) -> Iterator[None]:
        if self.tracker is not None and self.training and self.dropout_p > 0:
            with self.tracker.fork():
                yield
        else:
            yield

    def _alibi(self, distance: torch.Tensor) -> torch.Tensor:
        if self._slopes_tensor is None or self._slopes_tensor.device != distance.device:
            self._slopes_tensor = torch.tensor(self._slopes, dtype=torch.float32,
                                               device=distance.device)
        return alibi_bias(self._slopes_tensor, distance)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[s, b, local qkv]`` -> q ``[b, heads, s, d]``, k and v ``[b, kv heads, s, d]``."""
        s, b = qkv.shape[:2]
        grouped = qkv.view(s, b, self.local_kv_heads, self.n_rep + 2, self.head_dim)
        q = grouped[:, :, :, : self.n_rep].reshape(s, b, self.local_heads, self.head_dim)
        k = grouped[:, :, :, self.n_rep]
        v = grouped[:, :, :, self.n_rep + 1]
        return q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        *,
        layer_number: int,
        attention_type: str = "global",
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [s, b, h]`` -> ``(output [s, b, h], bias to add or None)``.

        ``kv``: this layer's cache buffers ``[b, local kv heads, max_len, head_dim]``; the new
        keys/values are written at ``inputs.start_pos`` and attention covers everything cached
        so far.
        """
        q, k, v = self._split_qkv(self.query_key_value(x))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(inputs.position_ids)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:
            start, end = inputs.start_pos, inputs.start_pos + q.shape[2]
            kv[0][:, :, start:end] = k
            kv[1][:, :, start:end] = v
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]
        context = self._attend(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), inputs,
                               layer_number, attention_type)
        b, _, s, _ = context.shape
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.dense(context), self.dense.output_bias

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inputs: AttentionInputs,
        layer_number: int,
        attention_type: str,
    ) -> torch.Tensor:
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention type {attention_type!r}")
        q_len, k_len = q.shape[2], k.shape[2]
        start = inputs.start_pos
        bias = inputs.position_bias
        needs_distance = (
            self.use_alibi or bias is not None or attention_type == "local"
            or inputs.attention_mask is not None or q_len not in (1, k_len)
        )  # fmt: skip
        distance = query_key_distance(q_len, k_len, start, q.device) if needs_distance else None

        if self.use_alibi:
            assert distance is not None
            alibi = self._alibi(distance)
            bias = alibi if bias is None else bias + alibi

        mask: torch.Tensor | None = None  # True = masked out, [b or 1, 1, q, k]
        if distance is not None:
            mask = (distance < 0)[None, None]
            if attention_type == "local":
                assert self.window is not None, "local attention needs sliding_window_width"
                mask = mask | (distance >= self.window)[None, None]
            if inputs.attention_mask is not None:
                mask = mask | inputs.attention_mask
        causal_flag = mask is None and q_len == k_len and q_len > 1

        dropout_p = self.dropout_p if self.training else 0.0
        plain = bias is None and mask is None
        fused_ok = attention_type == "flash" or (
            not self.softmax_in_fp32 and (self.masked_softmax_fusion or plain)
        )
        if fused_ok:
            attn_mask: torch.Tensor | None = None
            if bias is not None:
                attn_mask = bias.to(q.dtype)
                if mask is not None:
                    attn_mask = attn_mask.masked_fill(mask, torch.finfo(q.dtype).min)
            elif mask is not None:
                attn_mask = ~mask
            with self._dropout_rng():
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal_flag
                )

        if causal_flag:
            mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).triu(1)[None, None]
        coeff = float(layer_number) if self.query_key_layer_scaling else 1.0
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / (math.sqrt(self.head_dim) * coeff))
        if self.softmax_in_fp32:
            scores = scores.float()
        if coeff != 1.0:
            scores = scores * coeff
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        with self._dropout_rng():
            probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
        return torch.matmul(probs, v)
