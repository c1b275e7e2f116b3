"""Parameter counts and training FLOPs of the GPT model, from its config alone.

Mixture-of-experts layers count every expert once in :func:`parameter_count`; the FLOPs use
the active parameters (the router and ``moe_top_k`` experts per token).

Used by the dry-run summary, the MFU in the training logs and the benchmarks, so all of them
count the same way. The FLOPs count multiply-adds as 2 FLOPs and follow the usual
transformer accounting: every weight matrix costs 2 FLOPs per token per parameter forward and
4 backward; attention scores and the weighted sum cost 2 x 2 x seq x (heads x head_dim) per
token and layer forward (the full square, as Megatron-LM reports it); recomputed activations
add one more forward pass. Layers without attention (Mamba, RWKV, gMLP/aMLP) count their own
products (and scans) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.model.args import (
    GATED_ACTIVATIONS,
    MIXER_TYPES,
    ModelArgs,
    attention_layer_types,
    gmlp_width,
    is_moe_layer,
    mamba_dt_rank,
    mamba_inner_width,
    mlp_bias,
    mlp_width,
    moe_expert_width,
    rwkv_dims,
)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # width of the MLP hidden layer (each half when gated)
    expert_ffn: int  # width of one mixture-of-experts expert (each half when gated)
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
            expert_ffn=moe_expert_width(model),
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

    def expert_matmul_params(self) -> int:
        return self.hidden * self.expert_ffn * (2 if self.gated else 1) \
            + self.expert_ffn * self.hidden

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


def _mixer_matmul_params(model: ModelArgs, kind: str) -> int:
    """Weight-matrix parameters of one layer without attention (the products of its forward,
    2 FLOPs each per token)."""
    assert model.hidden_size is not None
    h = model.hidden_size
    if kind == "mamba":
        d, r = mamba_inner_width(model), mamba_dt_rank(model)
        return h * 2 * d + d * (r + 2 * 16) + r * d + d * h
    if kind == "rwkv":
        att, _, ffn = rwkv_dims(model)
        return 5 * h * att + h * 160 + 160 * h + h * 64 + 64 * att + h * ffn + h * h + ffn * h
    ff = gmlp_width(model)
    params = h * 2 * ff + ff * h
    if kind == "amlp":
        params += 2 * ff * 3 * model.gmlp_attn_dim + model.gmlp_attn_dim * ff
    return params


def _mixer_params(model: ModelArgs, kind: str) -> int:
    """All parameters of one layer without attention."""
    assert model.hidden_size is not None and model.seq_length is not None
    h = model.hidden_size
    total = _mixer_matmul_params(model, kind)
    if kind == "mamba":
        d = mamba_inner_width(model)
        total += _norm_params(model, h) + d * 4 + d + d * 16 + d  # conv, dt bias, A_log, D
        total += d if model.mamba_use_bias_in_conv else 0
        if model.mamba_use_bias_in_linears:
            total += 2 * d + mamba_dt_rank(model) + 2 * 16 + h
        return total
    if kind == "rwkv":
        att, head, _ = rwkv_dims(model)
        # ln1, ln2 (LayerNorm with bias), 8 mix vectors, decay and bonus, the group norm
        return total + 4 * h + 8 * h + att + att + 2 * att
    ff = gmlp_width(model)
    seq = model.seq_length
    total += _norm_params(model, h) + 2 * ff + _norm_params(model, ff) + seq * seq + seq + h
    if kind == "amlp":
        total += 3 * model.gmlp_attn_dim + ff
    return total


def _mixer_forward_flops(model: ModelArgs, kind: str) -> float:
    """Forward FLOPs per token of one layer without attention: its products, and the scan
    (Mamba: ``h = a * h + b`` and ``C . h``, 4 FLOPs per channel and state), the WKV state
    update and read (4 per channel and head dimension), the causal spatial gate (2 per feature
    and position)."""
    assert model.seq_length is not None
    flops = 2.0 * _mixer_matmul_params(model, kind)
    if kind == "mamba":
        return flops + 4.0 * mamba_inner_width(model) * 16 + 2.0 * 4 * mamba_inner_width(model)
    if kind == "rwkv":
        att, head, _ = rwkv_dims(model)
        return flops + 4.0 * att * head
    flops += 2.0 * model.seq_length * gmlp_width(model)
    if kind == "amlp":
        flops += 4.0 * model.seq_length * model.gmlp_attn_dim
    return flops


def _layer_kinds(model: ModelArgs) -> list[str]:
    assert model.num_layers is not None
    return attention_layer_types(model.attention_config, model.num_layers)


def parameter_count(model: ModelArgs, padded_vocab: int) -> int:
    """Trainable parameters of the model as built (shared layers counted once)."""
    s = ModelShape.from_config(model, padded_vocab)
    norm = _norm_params(model, s.hidden)
    per_layer = s.layer_matmul_params()
    if model.use_bias_in_attn_linear:
        per_layer += s.qkv_out + s.hidden
    if mlp_bias(model):
        per_layer += s.ffn * (2 if s.gated else 1) + s.hidden
    if model.use_qk_layernorm:  # one norm over head_dim for the queries, one for the keys
        per_layer += 2 * _norm_params(model, s.head_dim)
    norms_per_layer = 1 if (model.gpt_j_residual and model.gpt_j_tied) else 2
    per_layer += norms_per_layer * norm
    unique_layers = model.num_unique_layers or s.layers
    kinds = _layer_kinds(model)
    if set(kinds) & set(MIXER_TYPES):
        # layer u of the unique layers is built for the first depth that uses it
        plan = [(i % unique_layers) if model.param_sharing_style == "spaced"
                else i // (s.layers // unique_layers) for i in range(s.layers)]
        types = [kinds[plan.index(u)] for u in range(unique_layers)]
        layer_total = sum(_mixer_params(model, k) if k in MIXER_TYPES else per_layer
                          for k in types)
    else:
        layer_total = unique_layers * per_layer
    total = layer_total + norm  # + final norm
    # a mixture-of-experts layer: every expert once (no biases) and the router, instead of
    # the dense MLP and its biases (layers without attention have no MLP)
    mlp_biases = s.ffn * (2 if s.gated else 1) + s.hidden if mlp_bias(model) else 0
    experts = model.moe_num_experts
    moe_mlp = experts * s.expert_matmul_params() + experts * s.hidden
    total += sum(1 for d in _unique_depths(model)
                 if is_moe_layer(model, d) and kinds[d] not in MIXER_TYPES) * (
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
    return total - moe_layers * idle * s.expert_matmul_params()


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
    kinds = _layer_kinds(model)
    # a mixture-of-experts layer runs the router and moe_top_k experts per token
    moe_extra = 2.0 * (model.moe_top_k * s.expert_matmul_params() - s.mlp_matmul_params()
                       + s.hidden * model.moe_num_experts)
    layers_forward = sum(_mixer_forward_flops(model, k) if k in MIXER_TYPES else
                         layer_forward + (moe_extra if is_moe_layer(model, d) else 0.0)
                         for d, k in enumerate(kinds))
    forward = layers_forward + 2.0 * s.hidden * s.vocab
    total = 3.0 * forward
    if recompute:
        total += layers_forward
    return total
