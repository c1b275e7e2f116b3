"""Parameter counts and training FLOPs of the GPT model, from its config alone.

Mixture-of-experts layers count every expert once in :func:`parameter_count`; the FLOPs use
the active parameters (the router and ``moe_top_k`` experts per token).

Used by the dry-run summary, the MFU in the training logs and the benchmarks, so all of them
count the same way. The FLOPs count multiply-adds as 2 FLOPs and follow the usual
transformer accounting: every weight matrix costs 2 FLOPs per token per parameter forward and
4 backward; attention scores and the weighted sum cost 2 x 2 x seq x (heads x head_dim) per
token and layer forward (the full square, as Megatron-LM reports it); recomputed activations
add one more forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.model.args import GATED_ACTIVATIONS, ModelArgs, is_moe_layer, mlp_width


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # width of the MLP hidden layer (each half when gated)
    gated: bool
    vocab: int  # padded vocabulary
    seq: int

    @classmethod
    def from_config(cls, model: ModelArgs, padded_vocab: int) -> ModelShape:
        assert model.num_layers and model.hidden_size and model.num_attention_heads
        heads = model.num_attention_heads
        return cls(
            layers=model.num_layers,
            hidden=model.hidden_size,
            heads=heads,
            kv_heads=model.num_kv_heads or heads,
            head_dim=model.hidden_size // heads,
            ffn=mlp_width(model, model.activation),
            gated=model.activation in GATED_ACTIVATIONS,
            vocab=padded_vocab,
            seq=model.seq_length or 0,
        )

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def attention_matmul_params(self) -> int:
        return self.hidden * self.qkv_out + self.heads * self.head_dim * self.hidden

    def mlp_matmul_params(self) -> int:
        return self.hidden * self.ffn * (2 if self.gated else 1) + self.ffn * self.hidden

    def layer_matmul_params(self) -> int:
        return self.attention_matmul_params() + self.mlp_matmul_params()


def _norm_params(model: ModelArgs, dim: int) -> int:
    """Parameters of one norm over ``dim`` features (LayerNorm: weight and optional bias,
    RMSNorm: weight, ScaleNorm: one scalar)."""
    if model.norm == "scalenorm":
        return 1
    if model.norm == "layernorm" and model.use_bias_in_norms:
        return 2 * dim
    return dim


def parameter_count(model: ModelArgs, padded_vocab: int) -> int:
    """Trainable parameters of the model as built (shared layers counted once)."""
    s = ModelShape.from_config(model, padded_vocab)
    norm = _norm_params(model, s.hidden)
    per_layer = s.layer_matmul_params()
    if model.use_bias_in_attn_linear:
        per_layer += s.qkv_out + s.hidden
    if model.use_bias_in_mlp:
        per_layer += s.ffn * (2 if s.gated else 1) + s.hidden
    if model.use_qk_layernorm:  # one norm over head_dim for the queries, one for the keys
        per_layer += 2 * _norm_params(model, s.head_dim)
    norms_per_layer = 1 if (model.gpt_j_residual and model.gpt_j_tied) else 2
    per_layer += norms_per_layer * norm
    unique_layers = model.num_unique_layers or s.layers
    total = unique_layers * per_layer + norm  # + final norm
    # a mixture-of-experts layer: every expert once (no biases) and the router, instead of
    # the dense MLP and its biases
    mlp_biases = s.ffn * (2 if s.gated else 1) + s.hidden if model.use_bias_in_mlp else 0
    experts = model.moe_num_experts
    moe_mlp = experts * s.mlp_matmul_params() + experts * s.hidden
    total += sum(1 for d in _unique_depths(model) if is_moe_layer(model, d)) * (
        moe_mlp - s.mlp_matmul_params() - mlp_biases)
    total += s.vocab * s.hidden  # input embedding
    if model.no_weight_tying:
        total += s.vocab * s.hidden
    if model.pos_emb == "learned":
        assert model.max_position_embeddings is not None
        total += (model.max_position_embeddings + model.opt_pos_emb_offset) * s.hidden
    if model.pos_emb == "rpe":
        total += model.rpe_num_buckets * s.heads
    return total


def _unique_depths(model: ModelArgs) -> list[int]:
    """The depth each distinct layer is built for (the first depth that uses it)."""
    assert model.num_layers is not None
    unique = model.num_unique_layers or model.num_layers
    if model.param_sharing_style == "spaced" or unique == model.num_layers:
        return list(range(unique))
    repeat = model.num_layers // unique
    return [u * repeat for u in range(unique)]


def active_parameter_count(model: ModelArgs, padded_vocab: int) -> int:
    """Parameters one token uses: :func:`parameter_count` with each mixture-of-experts layer
    holding only its ``moe_top_k`` chosen experts (and the router)."""
    total = parameter_count(model, padded_vocab)
    if model.moe_num_experts <= 1:
        return total
    s = ModelShape.from_config(model, padded_vocab)
    idle = model.moe_num_experts - min(model.moe_top_k, model.moe_num_experts)
    moe_layers = sum(1 for d in _unique_depths(model) if is_moe_layer(model, d))
    return total - moe_layers * idle * s.mlp_matmul_params()


def flops_per_token(model: ModelArgs, padded_vocab: int, *, recompute: bool = False) -> float:
    """Training FLOPs per token: forward, backward (twice the forward: gradients with respect
    to the inputs and to the weights) and, with ``recompute``, one more forward of the
    transformer layers.

    Multiply-adds count 2 FLOPs. Forward, per token:

    * per layer, QKV projection ``2 * hidden * (heads + 2 * kv_heads) * head_dim`` (grouped-query
      attention narrows K and V), attention scores ``Q K^T`` and weighted sum ``A V``
      ``2 * 2 * seq * heads * head_dim`` (the full seq x seq square, no causal discount, as
      Megatron-LM counts), output projection ``2 * heads * head_dim * hidden``, MLP
      ``2 * hidden * ffn`` per input matrix (two of them for gated activations) plus
      ``2 * ffn * hidden`` for the output matrix;
    * once, the vocabulary projection ``2 * hidden * vocab`` (the embedding lookup is free).

    ``recompute`` (``checkpoint_activations``) adds the forward of every transformer layer
    again, recomputed during backward; the embedding, final norm and vocabulary projection are
    not recomputed. Elementwise work (norms, softmax, activations, rotary) is not counted.
    """
    s = ModelShape.from_config(model, padded_vocab)
    layer_forward = 2.0 * s.layer_matmul_params() + 4.0 * s.seq * s.heads * s.head_dim
    # a mixture-of-experts layer runs the router and moe_top_k experts per token
    moe_extra = 2.0 * (max(0, model.moe_top_k - 1) * s.mlp_matmul_params()
                       + s.hidden * model.moe_num_experts)
    moe_layers = sum(1 for d in range(s.layers) if is_moe_layer(model, d))
    layers_forward = s.layers * layer_forward + moe_layers * moe_extra
    forward = layers_forward + 2.0 * s.hidden * s.vocab
    total = 3.0 * forward
    if recompute:
        total += layers_forward
    return total
