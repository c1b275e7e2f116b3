"""One transformer layer: norms, attention, MLP and the residual connections.

Three residual forms (``x`` the layer input, ``drop`` = hidden dropout):

* pre-norm (default)::

      h = x + drop(attn(ln1(x)));  out = h + drop(mlp(ln2(h)))

* ``apply_residual_connection_post_layernorm`` -- the residual branches start from the
  normalized tensor::

      a = ln1(x);  h = a + drop(attn(a));  m = ln2(h);  out = m + drop(mlp(m))

* ``gpt_j_residual`` -- attention and MLP in parallel (GPT-J, GPT-NeoX, Pythia);
  ``gpt_j_tied`` feeds both from the one norm ``ln1``::

      out = x + drop(attn(ln1(x))) + drop(mlp(ln2(x)))

With sequence parallelism the norms and dropouts see this rank's part of the sequence: their
dropout masks come from the tracker's model-parallel stream and the norm parameters are marked
for the gradient all-reduce
(:func:`megatron.parallel.register_sequence_parallel_grad_hooks`).

Every ``moe_expert_interval``-th layer uses the mixture-of-experts block
(:class:`~megatron.model.moe.MoEMLP`) in place of the MLP.

A layer is built for one depth (``layer_number``, 1-based, and its ``attention_type``) and runs
as a block (``forward(Activations) -> Activations``); a layer shared by several depths
(``num_unique_layers``) is called with each depth's number and type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.args import ModelArgs, is_moe_layer
from megatron.model.attention import AttentionInputs, SelfAttention
from megatron.model.init_methods import InitFn
from megatron.model.layout import Activations
from megatron.model.mlp import MLP
from megatron.model.moe import MoEMLP
from megatron.model.norms import build_norm
from megatron.model.positional import RotaryEmbedding
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState


class TransformerLayer(nn.Module):
    def __init__(
        self,
        model: ModelArgs,
        *,
        state: ParallelState,
        tracker: RNGStatesTracker | None,
        sequence_parallel: bool,
        init_method: InitFn,
        output_init_method: InitFn,
        rotary: RotaryEmbedding | None = None,
        layer_number: int = 1,
        attention_type: str = "global",
    ) -> None:
        super().__init__()
        assert model.hidden_size is not None
        hidden = model.hidden_size
        self.layer_number = layer_number
        self.attention_type = attention_type
        self.parallel_residual = model.gpt_j_residual
        self.residual_from_norm = model.apply_residual_connection_post_layernorm
        self.hidden_dropout = model.hidden_dropout
        self.sequence_parallel = sequence_parallel
        self.tracker = tracker

        self.input_layernorm = build_norm(model, hidden, sequence_parallel=sequence_parallel)
        self.attention = SelfAttention(
            model, state=state, tracker=tracker, sequence_parallel=sequence_parallel,
            init_method=init_method, output_init_method=output_init_method, rotary=rotary,
        )  # fmt: skip
        if model.gpt_j_residual and model.gpt_j_tied:
            self.post_attention_layernorm: nn.Module | None = None
        else:
            self.post_attention_layernorm = build_norm(model, hidden,
                                                       sequence_parallel=sequence_parallel)
        mlp_cls = MoEMLP if is_moe_layer(model, layer_number - 1) else MLP
        self.mlp: MLP | MoEMLP = mlp_cls(
            model, state=state, sequence_parallel=sequence_parallel, init_method=init_method,
            output_init_method=output_init_method,
        )  # fmt: skip

    @contextlib.contextmanager
    def _dropout_rng(self) -> Iterator[None]:
        active = self.training and self.hidden_dropout > 0
        if active and self.sequence_parallel and self.tracker is not None:
            with self.tracker.fork():
                yield
        else:
            yield

    def _dropout(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``drop(x + bias)`` (``bias`` is set when the projection left it to us)."""
        if bias is not None:
            x = x + bias
        with self._dropout_rng():
            return F.dropout(x, p=self.hidden_dropout, training=self.training)

    def forward(
        self,
        act: Activations,
        *,
        layer_number: int | None = None,
        attention_type: str | None = None,
    ) -> Activations:
        """The block: hidden states in, hidden states out, at this layer's depth unless
        ``layer_number`` / ``attention_type`` say otherwise; uses this depth's slot of
        ``act.kv_cache`` when one is set."""
        number = self.layer_number if layer_number is None else layer_number
        kind = self.attention_type if attention_type is None else attention_type
        kv = act.kv_cache.layer(number - 1) if act.kv_cache is not None else None
        out = self.forward_hidden(act.x, act.inputs, layer_number=number, attention_type=kind,
                                  kv=kv)
        return act.with_x(out)

    def forward_hidden(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        *,
        layer_number: int,
        attention_type: str = "global",
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x [s, b, h] -> [s, b, h]``. ``layer_number`` is 1-based (query-key layer
        scaling); ``kv`` is this layer's KV-cache slot (see :class:`SelfAttention`)."""
        attn_kwargs = {"layer_number": layer_number, "attention_type": attention_type, "kv": kv}
        normed = self.input_layernorm(x)
        attn_out, attn_bias = self.attention(normed, inputs, **attn_kwargs)
        if self.parallel_residual:
            mlp_in = normed if self.post_attention_layernorm is None \
                else self.post_attention_layernorm(x)
            mlp_out, mlp_bias = self.mlp(mlp_in)
            residual = normed if self.residual_from_norm else x
            attn_out = self._dropout(attn_out, attn_bias)
            return residual + attn_out + self._dropout(mlp_out, mlp_bias)

        residual = normed if self.residual_from_norm else x
        h = residual + self._dropout(attn_out, attn_bias)
        assert self.post_attention_layernorm is not None
        normed = self.post_attention_layernorm(h)
        mlp_out, mlp_bias = self.mlp(normed)
        residual = normed if self.residual_from_norm else h
        return residual + self._dropout(mlp_out, mlp_bias)
