"""Mamba models <-> Hugging Face ``MambaForCausalLM``.

A model converts when every layer is a ``mamba`` layer, with RMSNorm, no position embedding
and no biases in the in/x/out projections (Hugging Face's ``x_proj`` has none); the sizes
Hugging Face derives (state 16, convolution 4, dt rank ``ceil(hidden / 16)``) are the ones the
layer uses. Names::

    embed.word_embeddings.weight      backbone.embeddings.weight
    layers.N.norm.weight              backbone.layers.N.norm.weight
    layers.N.mixer.conv_weight/bias   backbone.layers.N.mixer.conv1d.weight/bias
    layers.N.mixer.P                  backbone.layers.N.mixer.P  (in_proj, x_proj, dt_proj,
                                                                  out_proj, A_log, D)
    final_norm.weight                 backbone.norm_f.weight
    output_layer.weight (untied)      lm_head.weight

The layouts are the same on both sides (``in_proj`` rows ``[x; z]``), so tensors are copied
unchanged and a round trip is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from megatron.model.args import ModelArgs, attention_layer_types

StateDict = dict[str, torch.Tensor]
MIXER_NAMES = ("in_proj.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
               "out_proj.weight", "A_log", "D")


def _mixer_pairs(model: ModelArgs) -> list[tuple[str, str]]:
    """``(our name, HF name)`` of one layer's tensors, relative to the layer."""
    pairs = [("norm.weight", "norm.weight"), ("mixer.conv_weight", "mixer.conv1d.weight")]
    if model.mamba_use_bias_in_conv:
        pairs.append(("mixer.conv_bias", "mixer.conv1d.bias"))
    pairs += [(f"mixer.{n}", f"mixer.{n}") for n in MIXER_NAMES]
    return pairs


def check_export(model: ModelArgs, require: Callable[[bool, str, str], None]) -> None:
    assert model.num_layers is not None
    kinds = set(attention_layer_types(model.attention_config, model.num_layers))
    require(kinds == {"mamba"}, "attention_config",
            f"MambaForCausalLM has a Mamba block in every layer (got {sorted(kinds)})")
    require(model.norm == "rmsnorm", "norm", "MambaForCausalLM uses RMSNorm")
    require(model.pos_emb == "none", "pos_emb",
            f"MambaForCausalLM has no position embedding (got {model.pos_emb})")
    require(not model.mamba_use_bias_in_linears, "mamba_use_bias_in_linears",
            "MambaForCausalLM's x_proj has no bias")
    factor = model.expansion_factor or 2
    require(float(factor).is_integer(), "expansion_factor",
            f"MambaForCausalLM's expand is an integer (got {factor})")


def hf_config(model: ModelArgs, *, vocab_size: int, special: Mapping[str, int | None],
              dtype: torch.dtype) -> Any:
    from transformers import MambaConfig

    return MambaConfig(
        vocab_size=vocab_size, hidden_size=model.hidden_size, state_size=16,
        num_hidden_layers=model.num_layers, layer_norm_epsilon=model.rms_norm_epsilon,
        expand=int(model.expansion_factor or 2), conv_kernel=4, use_bias=False,
        use_conv_bias=model.mamba_use_bias_in_conv, hidden_act="silu",
        initializer_range=model.init_method_std, residual_in_fp32=True,
        time_step_rank="auto", tie_word_embeddings=not model.no_weight_tying,
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"), architectures=["MambaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], model: ModelArgs) -> StateDict:
    assert model.num_layers is not None
    out: StateDict = {"backbone.embeddings.weight": sd["embed.word_embeddings.weight"]}
    for i in range(model.num_layers):
        for ours, theirs in _mixer_pairs(model):
            out[f"backbone.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    out["backbone.norm_f.weight"] = sd["final_norm.weight"]
    if model.no_weight_tying:
        out["lm_head.weight"] = sd["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def neox_values_from_hf(hf: Any, error: Callable[[str], Exception]) -> dict[str, Any]:
    hidden = int(hf.hidden_size)
    expected = {"state_size": 16, "conv_kernel": 4, "hidden_act": "silu", "use_bias": False,
                "time_step_rank": math.ceil(hidden / 16)}
    for name, value in expected.items():
        if getattr(hf, name, value) != value:
            raise error(f"config.json: {name} {getattr(hf, name)!r} is not supported for mamba "
                        f"(only {value!r})")
    heads = math.gcd(hidden, 16)  # no attention; any divisor of hidden_size will do
    layers = int(hf.num_hidden_layers)
    values: dict[str, Any] = {
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
        "seq_length": 2048, "max_position_embeddings": 2048, "pos_emb": "none",
        "norm": "rmsnorm", "rms_norm_epsilon": float(hf.layer_norm_epsilon),
        "attention_config": [[["mamba"], layers]],
        "mamba_use_bias_in_conv": bool(hf.use_conv_bias), "mamba_use_bias_in_linears": False,
        "no_weight_tying": not bool(getattr(hf, "tie_word_embeddings", True)),
    }  # fmt: skip
    if int(hf.expand) != 2:
        values["expansion_factor"] = int(hf.expand)
    return values


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], model: ModelArgs,
                       get: Callable[..., torch.Tensor]) -> StateDict:
    assert model.num_layers is not None
    out: StateDict = {"embed.word_embeddings.weight": get(hf_sd, "backbone.embeddings.weight")}
    for i in range(model.num_layers):
        for ours, theirs in _mixer_pairs(model):
            out[f"layers.{i}.{ours}"] = get(hf_sd, f"backbone.layers.{i}.{theirs}")
    out["final_norm.weight"] = get(hf_sd, "backbone.norm_f.weight")
    if model.no_weight_tying:
        out["output_layer.weight"] = get(hf_sd, "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}
