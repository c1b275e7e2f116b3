"""What maps to what between this framework's GPT model and Hugging Face causal LMs.

Architectures: ``neox`` (``GPTNeoXForCausalLM``), ``llama`` (``LlamaForCausalLM``),
``mistral`` (``MistralForCausalLM``: Llama with every layer a sliding-window layer) and
``mamba`` (``MambaForCausalLM``, in :mod:`megatron.conversion.hf_mamba`) and
``mixtral`` (``MixtralForCausalLM``: Mistral-style attention with a mixture-of-experts MLP in
every layer).

* :func:`export_architecture` checks that a config can be expressed by the HF class (one-line
  :class:`ConversionError` naming the key otherwise); :func:`hf_config` builds its config;
  :func:`to_hf_state_dict` maps a full ``GPTModel`` state dict to HF names and layouts.
* :func:`neox_values_from_hf` gives this framework's model keys for an HF config and
  :func:`from_hf_state_dict` maps HF weights to ``GPTModel`` names.

Layouts: GPT-NeoX's fused ``query_key_value`` rows are per head ``[q, k, v]``, which is this
model's per-key/value-group layout with one query head per group, so it converts as is. Llama's
separate ``q_proj``/``k_proj``/``v_proj`` go into the fused weight group by group
(``[q heads of group g, k_g, v_g]``) and ``gate_proj``/``up_proj`` into ``dense_h_to_4h`` as
``[up; gate]`` (GPT-NeoX's order, :func:`~megatron.model.activations.fuse_gated`). Both HF families use rotate-half rotary embeddings on the first rotary
dimensions of each head, as this model does, so no permutation of q/k rows is needed.
GPT-NeoX always has LayerNorm biases and MLP biases: a model without them exports zeros there.
Mixtral's router (``block_sparse_moe.gate``) is this model's ``mlp.router``; expert ``e``'s
``w1`` (gate) and ``w3`` (up) are the two halves of ``mlp.w_in[e]`` in that order (the order of
Hugging Face's fused ``gate_up_proj``; GPT-NeoX keeps them as separate weights) and ``w2`` is
``mlp.w_out[e]``. Weights are written in the per-expert layout Mixtral checkpoints use on disk;
reading also accepts the fused ``mlp.experts.gate_up_proj`` / ``down_proj`` layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron.conversion import hf_mamba
from megatron.model.activations import fuse_gated, split_gated, tanh_gelu
from megatron.model.args import (
    ModelArgs,
    attention_layer_types,
    mlp_bias,
    mlp_width,
    moe_expert_width,
)

StateDict = dict[str, torch.Tensor]

ARCHITECTURES = ("neox", "llama", "mistral", "mamba", "mixtral")
HF_CLASSES = {"neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
              "mistral": "MistralForCausalLM", "mamba": "MambaForCausalLM",
              "mixtral": "MixtralForCausalLM"}
MODEL_TYPES = {"gpt_neox": "neox", "llama": "llama", "mistral": "mistral", "mamba": "mamba",
               "mixtral": "mixtral"}

# this framework's activation -> HF hidden_act
PLAIN_ACTS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu", "mish": "mish"}
GATED_ACTS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "bilinear": "linear",
              "glu": "sigmoid"}
# HF hidden_act -> (activation, openai_gelu)
HF_PLAIN = {"gelu": ("gelu", False), "gelu_new": ("gelu", True), "gelu_fast": ("gelu", True),
            "gelu_pytorch_tanh": ("gelu", True), "relu": ("relu", False),
            "silu": ("silu", False), "swish": ("silu", False), "mish": ("mish", False)}
HF_GATED = {v: k for k, v in GATED_ACTS.items()}


class ConversionError(ValueError):
    """A model or file that cannot be converted, reported as one line."""


# ------------------------------------------------------------------ export checks
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConversionError(f"{key}: {message}")


def export_architecture(model: ModelArgs, architecture: str) -> str:
    """Check that ``model`` can be written as ``architecture``; returns the HF family
    (``llama`` becomes ``mistral`` when every layer is a sliding-window layer)."""
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"--architecture: {architecture!r} is not one of "
                              f"{', '.join(ARCHITECTURES)}")
    name = HF_CLASSES[architecture]
    assert model.num_layers is not None and model.num_attention_heads is not None
    if architecture == "mamba":
        hf_mamba.check_export(model, _require)
        return architecture
    _require(model.pos_emb == "rotary", "pos_emb",
             f"{model.pos_emb} position encoding cannot be expressed by {name} (rotary only)")
    _require(not model.apply_residual_connection_post_layernorm,
             "apply_residual_connection_post_layernorm", f"not expressible by {name}")
    _require(not model.use_qk_layernorm, "use_qk_layernorm", f"not expressible by {name}")
    kinds = {"global" if k == "flash" else k
             for k in attention_layer_types(model.attention_config, model.num_layers)}
    if architecture == "mixtral":
        return _export_mixtral(model, kinds)
    _require(model.moe_num_experts == 1, "moe_num_experts",
             f"mixture-of-experts layers cannot be expressed by {name} "
             "(use --architecture mixtral)")
    if architecture == "llama" and kinds == {"local"}:
        architecture, name = "mistral", HF_CLASSES["mistral"]
    if architecture == "mistral":
        _require(kinds == {"local"} and model.sliding_window_width is not None,
                 "attention_config", "MistralForCausalLM needs every layer 'local' with "
                 "sliding_window_width")
    else:
        _require(kinds == {"global"}, "attention_config",
                 f"{name} has global attention in every layer (got {sorted(kinds)})")
    if architecture == "neox":
        _require(model.norm == "layernorm", "norm", f"{model.norm} cannot be expressed by {name} "
                 "(LayerNorm only; use --architecture llama for rmsnorm)")
        _require(model.activation in PLAIN_ACTS, "activation",
                 f"{model.activation} cannot be expressed by {name} (one of "
                 f"{', '.join(PLAIN_ACTS)}; gated MLPs need --architecture llama)")
        _require((model.num_kv_heads or model.num_attention_heads) == model.num_attention_heads,
                 "num_kv_heads", f"{name} has no grouped-query attention "
                 "(use --architecture llama)")
        return architecture
    _require(model.norm == "rmsnorm", "norm", f"{model.norm} cannot be expressed by {name} "
             "(RMSNorm only)")
    _require(model.activation in GATED_ACTS, "activation",
             f"{model.activation} cannot be expressed by {name} (gated MLP: "
             f"{', '.join(GATED_ACTS)})")
    _require(model.rotary_pct == 1.0, "rotary_pct",
             f"partial rotary ({model.rotary_pct}) cannot be expressed by {name}")
    _require(not model.gpt_j_residual, "gpt_j_residual",
             f"parallel attention/MLP residual cannot be expressed by {name}")
    if architecture == "mistral":
        _require(not model.use_bias_in_attn_linear, "use_bias_in_attn_linear",
                 "MistralForCausalLM has no attention biases")
        _require(not mlp_bias(model), "use_bias_in_mlp",
                 "MistralForCausalLM has no MLP biases")
    return architecture


def _export_mixtral(model: ModelArgs, kinds: set[str]) -> str:
    name = HF_CLASSES["mixtral"]
    _require(model.moe_num_experts > 1, "moe_num_experts",
             f"{name} needs mixture-of-experts layers (moe_num_experts > 1)")
    _require(model.moe_expert_interval == 1, "moe_expert_interval",
             f"{name} has a mixture-of-experts MLP in every layer (moe_expert_interval 1)")
    _require(model.moe_router_type == "topk", "moe_router_type",
             f"{name} routes with top-k softmax (moe_router_type topk)")
    _require(not model.moe_token_dropping, "moe_token_dropping", f"{name} drops no tokens")
    _require(kinds == {"global"} or (kinds == {"local"} and model.sliding_window_width),
             "attention_config", f"{name} uses one attention kind in every layer")
    _require(model.norm == "rmsnorm", "norm", f"{model.norm} cannot be expressed by {name}")
    _require(model.activation in GATED_ACTS, "activation",
             f"{model.activation} cannot be expressed by {name} (gated MLP)")
    _require(model.rotary_pct == 1.0, "rotary_pct", f"partial rotary is not in {name}")
    _require(not model.gpt_j_residual, "gpt_j_residual", f"not expressible by {name}")
    _require(not model.use_bias_in_attn_linear, "use_bias_in_attn_linear",
             f"{name} has no attention biases")
    return "mixtral"


# ------------------------------------------------------------------ HF config
def hf_config(model: ModelArgs, architecture: str, *, vocab_size: int,
              special: Mapping[str, int | None], dtype: torch.dtype) -> Any:
    """The ``transformers`` config of the exported model (``architecture`` as returned by
    :func:`export_architecture`)."""
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, MixtralConfig

    if architecture == "mamba":
        return hf_mamba.hf_config(model, vocab_size=vocab_size, special=special, dtype=dtype)
    assert model.hidden_size and model.num_attention_heads and model.num_layers
    heads = model.num_attention_heads
    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": heads,
        "intermediate_size": moe_expert_width(model) if architecture == "mixtral"
        else mlp_width(model, model.activation),
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": not model.no_weight_tying,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "architectures": [HF_CLASSES[architecture]],
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_emb_base)}
    if architecture == "neox":
        act = "gelu_pytorch_tanh" if model.activation == "gelu" and tanh_gelu(model) \
            else PLAIN_ACTS[model.activation]
        rope["partial_rotary_factor"] = float(model.rotary_pct)
        return GPTNeoXConfig(
            **common, hidden_act=act, layer_norm_eps=model.layernorm_epsilon,
            use_parallel_residual=model.gpt_j_residual,
            attention_bias=model.use_bias_in_attn_linear, hidden_dropout=model.hidden_dropout,
            rope_parameters=rope,
        )  # fmt: skip
    llama_like = {
        "num_key_value_heads": model.num_kv_heads or heads, "hidden_act": GATED_ACTS[
            model.activation], "rms_norm_eps": model.rms_norm_epsilon, "rope_parameters": rope,
        "head_dim": model.hidden_size // heads,
    }  # fmt: skip
    if architecture == "mistral":
        return MistralConfig(**common, **llama_like, sliding_window=model.sliding_window_width)
    if architecture == "mixtral":
        local = model.attention_config is not None and "local" in attention_layer_types(
            model.attention_config, model.num_layers)
        return MixtralConfig(
            **common, **llama_like, num_local_experts=model.moe_num_experts,
            num_experts_per_tok=model.moe_top_k, router_aux_loss_coef=model.moe_aux_loss_coeff,
            router_jitter_noise=float(model.moe_jitter_eps or 0.0), output_router_logits=False,
            sliding_window=model.sliding_window_width if local else None,
        )  # fmt: skip
    return LlamaConfig(**common, **llama_like, attention_bias=model.use_bias_in_attn_linear,
                       mlp_bias=mlp_bias(model))


# ------------------------------------------------------------------ weights out
def _qkv_to_llama(qkv: torch.Tensor, model: ModelArgs) -> tuple[torch.Tensor, ...]:
    """Fused ``[kv groups x (n_rep q heads, k, v)] x ...`` rows -> ``q, k, v``."""
    assert model.hidden_size and model.num_attention_heads
    heads = model.num_attention_heads
    kv = model.num_kv_heads or heads
    hd, n_rep = model.hidden_size // heads, heads // kv
    grouped = qkv.reshape(kv, (n_rep + 2) * hd, *qkv.shape[1:])
    q, k, v = grouped.split([n_rep * hd, hd, hd], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


def _qkv_from_llama(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    model: ModelArgs) -> torch.Tensor:
    assert model.hidden_size and model.num_attention_heads
    heads = model.num_attention_heads
    kv = model.num_kv_heads or heads
    hd, n_rep = model.hidden_size // heads, heads // kv
    rest = q.shape[1:]
    return torch.cat([q.reshape(kv, n_rep * hd, *rest), k.reshape(kv, hd, *rest),
                      v.reshape(kv, hd, *rest)], dim=1).reshape(-1, *rest)


def _bias_or_zeros(sd: Mapping[str, torch.Tensor], name: str, rows: int,
                   like: torch.Tensor) -> torch.Tensor:
    return sd[name] if name in sd else torch.zeros(rows, dtype=like.dtype)


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], model: ModelArgs,
                     architecture: str) -> StateDict:
    """HF weights of a full ``GPTModel`` state dict (shared layers already expanded)."""
    assert model.num_layers is not None and model.hidden_size is not None
    if architecture == "mamba":
        return hf_mamba.to_hf_state_dict(sd, model)
    h = model.hidden_size
    out: StateDict = {}
    neox = architecture == "neox"
    base = "gpt_neox." if neox else "model."
    out[base + ("embed_in.weight" if neox else "embed_tokens.weight")] = \
        sd["embed.word_embeddings.weight"]
    for i in range(model.num_layers):
        src, dst = f"layers.{i}.", f"{base}layers.{i}."
        ln1 = sd[src + "input_layernorm.weight"]
        ln2_name = src + "post_attention_layernorm."
        ln2_src = ln2_name if ln2_name + "weight" in sd else src + "input_layernorm."
        qkv_w = sd[src + "attention.query_key_value.weight"]
        if neox:
            up_w = sd[src + "mlp.dense_h_to_4h.weight"]
            for norm, origin in (("input_layernorm.", src + "input_layernorm."),
                                 ("post_attention_layernorm.", ln2_src)):
                out[dst + norm + "weight"] = sd[origin + "weight"]
                out[dst + norm + "bias"] = _bias_or_zeros(sd, origin + "bias", h, ln1)
            out[dst + "attention.query_key_value.weight"] = qkv_w
            out[dst + "attention.dense.weight"] = sd[src + "attention.dense.weight"]
            if model.use_bias_in_attn_linear:
                out[dst + "attention.query_key_value.bias"] = \
                    sd[src + "attention.query_key_value.bias"]
                out[dst + "attention.dense.bias"] = sd[src + "attention.dense.bias"]
            out[dst + "mlp.dense_h_to_4h.weight"] = up_w
            out[dst + "mlp.dense_h_to_4h.bias"] = _bias_or_zeros(
                sd, src + "mlp.dense_h_to_4h.bias", up_w.shape[0], up_w)
            out[dst + "mlp.dense_4h_to_h.weight"] = sd[src + "mlp.dense_4h_to_h.weight"]
            out[dst + "mlp.dense_4h_to_h.bias"] = _bias_or_zeros(
                sd, src + "mlp.dense_4h_to_h.bias", h, up_w)
            continue
        out[dst + "input_layernorm.weight"] = ln1
        out[dst + "post_attention_layernorm.weight"] = sd[ln2_src + "weight"]
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), _qkv_to_llama(qkv_w, model)):
            out[dst + f"self_attn.{proj}.weight"] = t
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.dense.weight"]
        if model.use_bias_in_attn_linear:
            qkv_b = sd[src + "attention.query_key_value.bias"]
            for proj, t in zip(("q_proj", "k_proj", "v_proj"), _qkv_to_llama(qkv_b, model)):
                out[dst + f"self_attn.{proj}.bias"] = t
            out[dst + "self_attn.o_proj.bias"] = sd[src + "attention.dense.bias"]
        if architecture == "mixtral":
            out.update(_experts_to_mixtral(sd, src, dst, model))
            continue
        gate, up = split_gated(sd[src + "mlp.dense_h_to_4h.weight"])
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.dense_4h_to_h.weight"]
        if mlp_bias(model):
            gate_b, up_b = split_gated(sd[src + "mlp.dense_h_to_4h.bias"])
            out[dst + "mlp.gate_proj.bias"], out[dst + "mlp.up_proj.bias"] = gate_b, up_b
            out[dst + "mlp.down_proj.bias"] = sd[src + "mlp.dense_4h_to_h.bias"]
    final = "final_layer_norm." if neox else "norm."
    out[base + final + "weight"] = sd["final_norm.weight"]
    if neox:
        out[base + final + "bias"] = _bias_or_zeros(sd, "final_norm.bias", h,
                                                    sd["final_norm.weight"])
    if model.no_weight_tying:
        out["embed_out.weight" if neox else "lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _experts_to_mixtral(sd: Mapping[str, torch.Tensor], src: str, dst: str,
                        model: ModelArgs) -> StateDict:
    out: StateDict = {dst + "block_sparse_moe.gate.weight": sd[src + "mlp.router.weight"]}
    w_in, w_out = sd[src + "mlp.w_in"], sd[src + "mlp.w_out"]
    for e in range(model.moe_num_experts):
        gate, up = w_in[e].chunk(2, dim=0)
        name = f"{dst}block_sparse_moe.experts.{e}."
        out[name + "w1.weight"], out[name + "w3.weight"] = gate, up
        out[name + "w2.weight"] = w_out[e]
    return out


def _experts_from_mixtral(hf_sd: Mapping[str, torch.Tensor], src: str, dst: str,
                          model: ModelArgs) -> StateDict:
    out: StateDict = {}
    fused = src + "mlp.experts.gate_up_proj"
    if fused in hf_sd:
        out[dst + "mlp.router.weight"] = _get(hf_sd, src + "mlp.gate.weight")
        out[dst + "mlp.w_in"] = hf_sd[fused]
        out[dst + "mlp.w_out"] = _get(hf_sd, src + "mlp.experts.down_proj")
        return out
    moe = src + "block_sparse_moe."
    out[dst + "mlp.router.weight"] = _get(hf_sd, moe + "gate.weight")
    w_in, w_out = [], []
    for e in range(model.moe_num_experts):
        name = f"{moe}experts.{e}."
        w_in.append(torch.cat([_get(hf_sd, name + "w1.weight"), _get(hf_sd, name + "w3.weight")]))
        w_out.append(_get(hf_sd, name + "w2.weight"))
    out[dst + "mlp.w_in"], out[dst + "mlp.w_out"] = torch.stack(w_in), torch.stack(w_out)
    return out


# ------------------------------------------------------------------ HF in
def hf_architecture(hf: Any) -> str:
    arch = MODEL_TYPES.get(getattr(hf, "model_type", None) or "")
    if arch is None:
        raise ConversionError(f"config.json: model_type {getattr(hf, 'model_type', None)!r} is "
                              f"not supported (supported: {', '.join(MODEL_TYPES)})")
    return arch


def _rope(hf: Any) -> tuple[int, float]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise ConversionError(f"config.json: rope_parameters.rope_type {kind!r} is not supported "
                              "(default rotary only)")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None) or
                       getattr(hf, "rotary_emb_base", 10000))
    if float(theta) != int(float(theta)):
        raise ConversionError(f"config.json: rope_theta {theta} is not an integer "
                              "(rotary_emb_base is an integer key)")
    pct = params.get("partial_rotary_factor", getattr(hf, "rotary_pct", 1.0))
    return int(float(theta)), float(pct if pct is not None else 1.0)


def neox_values_from_hf(hf: Any) -> tuple[str, dict[str, Any]]:
    """``(architecture, model keys)`` of this framework for HF config ``hf``."""
    arch = hf_architecture(hf)
    if arch == "mamba":
        return arch, hf_mamba.neox_values_from_hf(hf, ConversionError)
    theta, pct = _rope(hf)
    hidden, heads = hf.hidden_size, hf.num_attention_heads
    values: dict[str, Any] = {
        "num_layers": hf.num_hidden_layers, "hidden_size": hidden, "num_attention_heads": heads,
        "intermediate_size": hf.intermediate_size,
        "seq_length": hf.max_position_embeddings,
        "max_position_embeddings": hf.max_position_embeddings,
        "pos_emb": "rotary", "rotary_emb_base": theta,
        "no_weight_tying": not bool(getattr(hf, "tie_word_embeddings", False)),
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
    }  # fmt: skip
    act = hf.hidden_act
    if arch == "neox":
        if act not in HF_PLAIN:
            raise ConversionError(f"config.json: hidden_act {act!r} is not supported for "
                                  f"gpt_neox ({', '.join(HF_PLAIN)})")
        activation, tanh = HF_PLAIN[act]
        values.update(
            num_kv_heads=heads, norm="layernorm", layernorm_epsilon=float(hf.layer_norm_eps),
            rotary_pct=pct, gpt_j_residual=bool(hf.use_parallel_residual), activation=activation,
            openai_gelu=tanh, use_bias_in_norms=True, use_bias_in_mlp=True,
            use_bias_in_attn_linear=bool(getattr(hf, "attention_bias", True)),
            hidden_dropout=float(getattr(hf, "hidden_dropout", 0.0) or 0.0),
        )  # fmt: skip
        return arch, values
    if act not in HF_GATED:
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported for "
                              f"{hf.model_type} ({', '.join(HF_GATED)})")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"config.json: head_dim {head_dim} differs from hidden_size / "
                              f"num_attention_heads = {hidden // heads}")
    if pct != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor {pct} (Llama rotates whole "
                              "heads)")
    values.update(
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, norm="rmsnorm",
        rms_norm_epsilon=float(hf.rms_norm_eps), rotary_pct=1.0, activation=HF_GATED[act],
        use_bias_in_norms=False, use_bias_in_attn_linear=bool(getattr(hf, "attention_bias", False)),
        use_bias_in_mlp=bool(getattr(hf, "mlp_bias", False)),
    )  # fmt: skip
    if arch in ("llama", "mistral"):
        # GPT-NeoX's gated MLP is 1/3 of intermediate_size wide (mlp_projection_widths)
        values.update(intermediate_size=3 * hf.intermediate_size, mlp_multiple_of=1)
    if arch == "mixtral":
        jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
        values.update(
            moe_num_experts=int(hf.num_local_experts), moe_top_k=int(hf.num_experts_per_tok),
            moe_router_type="topk", moe_expert_interval=1,
            moe_aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
            moe_jitter_eps=jitter or None,
        )  # fmt: skip
    window = getattr(hf, "sliding_window", None) if arch in ("mistral", "mixtral") else None
    if window is not None:
        values.update(attention_config=[[["local"], hf.num_hidden_layers]],
                      sliding_window_width=int(window))
    return arch, values


def _get(sd: Mapping[str, torch.Tensor], *names: str) -> torch.Tensor:
    for name in names:
        if name in sd:
            return sd[name]
    raise ConversionError(f"HF weights: {names[0]} is missing")


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], model: ModelArgs,
                       architecture: str) -> StateDict:
    """Full ``GPTModel`` state dict of HF weights ``hf_sd`` (for the model of
    :func:`neox_values_from_hf`)."""
    assert model.num_layers is not None
    if architecture == "mamba":
        return hf_mamba.from_hf_state_dict(hf_sd, model, _get)
    neox = architecture == "neox"
    base = "gpt_neox." if neox else "model."
    out: StateDict = {}
    out["embed.word_embeddings.weight"] = _get(
        hf_sd, base + ("embed_in.weight" if neox else "embed_tokens.weight"))
    for i in range(model.num_layers):
        src, dst = f"{base}layers.{i}.", f"layers.{i}."
        if neox:
            names = ["input_layernorm.weight", "input_layernorm.bias",
                     "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                     "attention.query_key_value.weight", "attention.dense.weight",
                     "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                     "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
            if model.use_bias_in_attn_linear:
                names += ["attention.query_key_value.bias", "attention.dense.bias"]
            for name in names:
                out[dst + name] = _get(hf_sd, src + name)
            continue
        out[dst + "input_layernorm.weight"] = _get(hf_sd, src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = _get(
            hf_sd, src + "post_attention_layernorm.weight")
        q, k, v = (_get(hf_sd, src + f"self_attn.{p}_proj.weight") for p in "qkv")
        out[dst + "attention.query_key_value.weight"] = _qkv_from_llama(q, k, v, model)
        out[dst + "attention.dense.weight"] = _get(hf_sd, src + "self_attn.o_proj.weight")
        if model.use_bias_in_attn_linear:
            qb, kb, vb = (_get(hf_sd, src + f"self_attn.{p}_proj.bias") for p in "qkv")
            out[dst + "attention.query_key_value.bias"] = _qkv_from_llama(qb, kb, vb, model)
            out[dst + "attention.dense.bias"] = _get(hf_sd, src + "self_attn.o_proj.bias")
        if architecture == "mixtral":
            out.update(_experts_from_mixtral(hf_sd, src, dst, model))
            continue
        out[dst + "mlp.dense_h_to_4h.weight"] = fuse_gated(
            _get(hf_sd, src + "mlp.gate_proj.weight"), _get(hf_sd, src + "mlp.up_proj.weight"))
        out[dst + "mlp.dense_4h_to_h.weight"] = _get(hf_sd, src + "mlp.down_proj.weight")
        if mlp_bias(model):
            out[dst + "mlp.dense_h_to_4h.bias"] = fuse_gated(
                _get(hf_sd, src + "mlp.gate_proj.bias"), _get(hf_sd, src + "mlp.up_proj.bias"))
            out[dst + "mlp.dense_4h_to_h.bias"] = _get(hf_sd, src + "mlp.down_proj.bias")
    final = base + ("final_layer_norm." if neox else "norm.")
    out["final_norm.weight"] = _get(hf_sd, final + "weight")
    if neox:
        out["final_norm.bias"] = _get(hf_sd, final + "bias")
    if model.no_weight_tying:
        out["output_layer.weight"] = _get(hf_sd, "embed_out.weight", "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}
