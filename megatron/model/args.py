"""The model's architecture config: :class:`ModelArgs` and the rules derived from it.

This is the one home of the architecture keys (the config schema imports :class:`ModelArgs`
from here as its ``model`` section), of the attention-type and activation tables, and of the
width rule of the MLP. It imports nothing heavier than the config field helpers, so the config
package can load it without torch or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from megatron.neox_arguments.fields import key

PosEmb = Literal["learned", "sinusoidal", "rotary", "rpe", "alibi", "none"]
Norm = Literal["layernorm", "rmsnorm", "scalenorm"]
Activation = Literal[
    "gelu", "relu", "silu", "swish", "mish", "softsign",
    "geglu", "reglu", "swiglu", "bilinear", "glu",
]  # fmt: skip
InitMethod = Literal[
    "normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
    "xavier_normal", "wang_init", "small_init", "single_residual_scaled_normal",
]  # fmt: skip

#: Activations whose first projection has two halves ``[up; gate]`` (``act(gate) * up``).
GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu", "bilinear", "glu")

#: The attention types an ``attention_config`` entry may name: ``global`` (causal attention over
#: every earlier token), ``flash`` (the same through the fused kernel), ``local`` (causal
#: attention over the last ``sliding_window_width`` tokens), and the layers that replace a
#: transformer layer as a whole (:data:`MIXER_TYPES`).
ATTENTION_TYPES = ("global", "flash", "local", "mamba", "rwkv", "gmlp", "amlp")
#: Layer types without attention: a Mamba block, an RWKV-6 block, a gMLP block and an aMLP block
#: (gMLP with a one-head tiny attention in its gate).
MIXER_TYPES = ("mamba", "rwkv", "gmlp", "amlp")
#: GPT-NeoX's sparse attention types: recognised, refused (they need DeepSpeed's GPU kernels).
SPARSE_ATTENTION_TYPES = (
    "sparse_fixed", "sparse_variable", "bigbird", "bslongformer",
)  # fmt: skip


@dataclass(frozen=True)
class ModelArgs:
    num_layers: int | None = key(None, "Number of transformer layers.", origin="Meg")
    hidden_size: int | None = key(None, "Transformer hidden size.", origin="Meg")
    num_attention_heads: int | None = key(None, "Number of attention (query) heads.",
                                          origin="Meg")
    num_kv_heads: int | None = key(
        None, "Number of key/value heads for grouped-query attention; unset means "
        "num_attention_heads (multi-head attention).")
    intermediate_size: int | None = key(
        None, "MLP base width as GPT-NeoX counts it (default 4 x hidden_size). Gated "
        "activations take 2/3 of it for both halves together, so each half is "
        "intermediate_size / 3 (rounded by mlp_multiple_of): Llama-2-7B's 11008 is "
        "intermediate_size 32768 with mlp_multiple_of 256. Mixture-of-experts experts and "
        "mlp_type: llama take it as the width of each half.")
    mlp_multiple_of: int = key(
        1, "Round the MLP's first projection up to a multiple of 2 x this and the second "
        "projection's input to a multiple of this (Llama uses 256).")
    seq_length: int | None = key(None, "Training sequence length.", origin="Meg")
    max_position_embeddings: int | None = key(
        None, "Largest position the model supports (size of the learned position table); "
        "defaults to seq_length.", origin="Meg")
    norm: Norm = key("layernorm", "Normalization layer: layernorm, rmsnorm or scalenorm.")
    layernorm_epsilon: float = key(1.0e-5, "LayerNorm epsilon.", origin="Meg")
    rms_norm_epsilon: float = key(1.0e-8, "RMSNorm epsilon.")
    scalenorm_epsilon: float = key(1.0e-8, "ScaleNorm epsilon.")
    use_bias_in_norms: bool = key(True, "Learn a bias in LayerNorm (rmsnorm/scalenorm have none).")
    layernorm_fusion: bool = key(False, "Use a fused LayerNorm kernel where one is available "
                                 "(same numbers).",
                                 hint="LayerNorm always runs as torch's layer_norm, which is "
                                 "already one fused kernel")
    rmsnorm_fusion: bool = key(False, "Use a fused RMSNorm kernel where one is available "
                               "(same numbers).")
    pos_emb: PosEmb = key(
        "learned", "Position encoding: learned, sinusoidal, rotary, rpe (T5 relative buckets), "
        "alibi or none.")
    rpe_num_buckets: int = key(32, "T5 relative position encoding: number of buckets.")
    rpe_max_distance: int = key(128, "T5 relative position encoding: maximum distance.")
    rotary_pct: float = key(1.0, "Fraction of each head's dimensions that rotary embeddings "
                            "rotate (partial rotary, as in GPT-NeoX/Pythia).")
    rotary_emb_base: int = key(10000, "Base of the rotary embedding frequencies.")
    rotary_save_freqs_buffer: bool = key(
        False, "Keep the rotary inverse-frequency buffer in checkpoints.")
    rope_fusion: bool = key(False, "Use a fused rotary kernel where one is available "
                            "(same numbers).",
                            hint="rotary embeddings always run as plain tensor operations (no "
                            "fused rotary kernel is provided)")
    opt_pos_emb_offset: int = key(0, "Offset added to learned position ids (OPT uses 2).")
    no_weight_tying: bool = key(False, "Untie the input embedding and the output layer.")
    activation: Activation = key(
        "gelu", "MLP activation: gelu, relu, silu/swish, mish, softsign, or the gated geglu, "
        "reglu, swiglu, bilinear, glu.")
    geglu: bool = key(False, "Legacy switch for the geglu activation (same as activation: geglu).")
    openai_gelu: bool = key(False, "Use the tanh approximation of GeLU.", origin="Meg")
    onnx_safe: bool = key(False, "Use ONNX-exportable operations where they differ.", origin="Meg",
                          hint="ONNX export is not provided; the model's operations are the "
                          "same either way")
    use_bias_in_attn_linear: bool = key(True, "Biases in the QKV and attention output "
                                        "projections.")
    use_bias_in_mlp: bool = key(True, "Biases in the MLP projections.")
    use_qk_layernorm: bool = key(False, "LayerNorm on queries and keys before attention.")
    attention_config: list | None = key(
        None, "Attention type per layer as [[[types], count], ...], e.g. [[['global'], 12]]. "
        "Types: global, flash (global attention through the fused kernel), local (sliding "
        "window); the sparse types need DeepSpeed's GPU sparse-attention kernels.")
    sparsity_config: dict | None = key(
        None, "Settings for DeepSpeed sparse attention layers.",
        unsupported="DeepSpeed sparse attention needs its GPU (triton) kernels, which are not "
        "provided; remove sparsity_config")
    sliding_window_width: int | None = key(
        None, "Window of 'local' attention layers (tokens each query sees, itself included).")
    sparsity: Literal["none", "all", "interspersed"] = key(
        "none", "Legacy sparse attention switch: none, all or interspersed.",
        unsupported="sparse attention needs DeepSpeed's GPU sparse-attention kernels, which are "
        "not provided; use attention_config with global, flash or local")
    num_unique_layers: int | None = key(
        None, "Number of distinct transformer layers; num_layers must be a multiple. Layers "
        "are shared according to param_sharing_style.", origin="Meg")
    param_sharing_style: Literal["grouped", "spaced"] = key(
        "grouped", "With num_unique_layers: 'grouped' repeats each unique layer consecutively "
        "(AABB), 'spaced' cycles through them (ABAB).", origin="Meg")
    make_vocab_size_divisible_by: int = key(
        128, "Pad the vocabulary to a multiple of this times model_parallel_size.", origin="Meg")
    apply_residual_connection_post_layernorm: bool = key(
        False, "Take the residual from after the input norm (original BERT ordering).",
        origin="Meg")
    gpt_j_residual: bool = key(False, "Parallel attention and MLP (GPT-J / Pythia residual).")
    gpt_j_tied: bool = key(False, "With gpt_j_residual, use one input norm for both branches.")
    scaled_upper_triang_masked_softmax_fusion: bool = key(
        False, "Fuse scaling, causal masking and softmax.", origin="Meg",
        hint="causal attention already runs as torch's scaled_dot_product_attention, which "
        "fuses scaling, causal masking and softmax")
    scaled_masked_softmax_fusion: bool = key(
        False, "Fuse scaling, general masking and softmax.", origin="Meg")
    bias_gelu_fusion: bool = key(
        False, "Fuse the MLP bias add with GeLU; as GPT-NeoX's fused kernel, the GeLU is then the "
        "tanh approximation.", origin="Meg")
    bias_dropout_fusion: bool = key(False, "Fuse bias add, dropout and residual add.",
                                    origin="Meg")
    use_flashattn_swiglu: bool = key(False, "Use flash-attn's fused SwiGLU kernel when "
                                     "installed (GPU only).",
                                     hint="SwiGLU always runs as plain tensor operations (the "
                                     "same numbers flash-attn's kernel computes)")
    fp16_lm_cross_entropy: bool = key(
        False, "Compute the language-model cross entropy in the half precision type instead "
        "of fp32.", origin="Meg")
    init_method_std: float = key(0.02, "Standard deviation of the normal initializations.",
                                 origin="Meg")
    init_method: InitMethod = key("normal", "Initialization of the input-side weights.")
    output_layer_init_method: InitMethod = key(
        "scaled_normal", "Initialization of the layers that write into the residual stream "
        "(attention output and MLP down projections).")
    output_layer_parallelism: Literal["column"] = key(
        "column", "How the output layer is split over tensor-parallel ranks.")
    apply_query_key_layer_scaling: bool = key(
        False, "Scale Q.K^T by 1/layer_number (and back in softmax); turns on "
        "attention_softmax_in_fp32.", origin="Meg")
    attention_softmax_in_fp32: bool = key(False, "Run attention masking and softmax in fp32.",
                                          origin="Meg")
    use_cpu_initialization: bool = key(False, "Initialize parallel weights on the CPU.",
                                       origin="Meg",
                                       hint="parallel weights are always initialized as full "
                                       "fp32 masters on the CPU and then split over the ranks")
    attention_dropout: float = key(0.0, "Dropout on the attention probabilities.", origin="Meg")
    hidden_dropout: float = key(0.0, "Dropout on the outputs of attention and MLP.",
                                origin="Meg")
    use_mup: bool = key(False, "Maximal update parametrization.",
                        unsupported="muP is not supported")
    coord_check: bool = key(False, "muP: plot a coordinate check.",
        unsupported="muP is not supported")
    save_base_shapes: bool = key(False, "muP: save the base shapes to base_shapes_file.",
        unsupported="muP is not supported")
    base_shapes_file: str | None = key(None, "muP: base shapes file.",
        unsupported="muP is not supported")
    mup_init_scale: float = key(1.0, "muP: initialization scale.",
        unsupported="muP is not supported")
    mup_attn_temp: float = key(1.0, "muP: attention temperature.",
        unsupported="muP is not supported")
    mup_output_temp: float = key(1.0, "muP: output temperature.",
        unsupported="muP is not supported")
    mup_embedding_mult: float = key(1.0, "muP: embedding multiplier.",
        unsupported="muP is not supported")
    mup_rp_embedding_mult: float = key(1.0, "muP: relative-position embedding multiplier.",
        unsupported="muP is not supported")
    mup_width_scale: int = key(2, "muP: width scale of the delta model.",
        unsupported="muP is not supported")
    soft_prompt_tuning: dict | None = key(None, "Soft prompt tuning settings.",
                                          unsupported="soft prompt tuning is not supported")
    mlp_type: Literal["regular", "llama"] = key(
        "regular", "Legacy switch: 'llama' means a SwiGLU MLP without biases, whose "
        "intermediate_size is the width of each half; without intermediate_size each half is "
        "8/3 x hidden_size rounded up to a multiple of 256 (GPT-NeoX's former Llama MLP).")
    # --- layers without attention (attention_config types mamba, rwkv, gmlp, amlp); docs/ssm.md
    mamba_selective_scan_fusion: bool = key(
        False, "Mamba layers: run the selective scan with mamba_ssm's fused kernel (GPU with "
        "the package; otherwise the pure PyTorch scan is used, with a notice).")
    mamba_causal_conv_fusion: bool = key(
        False, "Mamba layers: run the causal convolution with causal_conv1d's kernel (GPU with "
        "the package; otherwise the pure PyTorch convolution, with a notice).")
    mamba_inner_func_fusion: bool = key(
        False, "Mamba layers: run everything after the input projection with mamba_ssm's fused "
        "inner function (supersedes the scan and conv fusions; GPU with the package only).")
    mamba_selective_fp32_params: bool = key(
        True, "Mamba layers: keep A_log and D in fp32 (the scan itself always runs in fp32). "
        "With bf16/fp16 training only false is accepted: DeepSpeed casts every parameter.")
    mamba_use_bias_in_conv: bool = key(True, "Mamba layers: bias in the causal convolution.")
    mamba_use_bias_in_linears: bool = key(
        False, "Mamba layers: biases in the in/x/out projections (not with "
        "mamba_inner_func_fusion).")
    expansion_factor: float | None = key(
        None, "Width multiple: the transformer MLP's base width is expansion_factor x "
        "hidden_size when intermediate_size is unset; Mamba's inner width (default 2), RWKV's "
        "channel-mix width (default 3.5; intermediate_size wins), gMLP/aMLP's feed-forward "
        "width (default 4).")
    dim_att: int | None = key(None, "RWKV layers: width of the time-mix (default hidden_size).")
    head_size: int | None = key(
        None, "RWKV layers: size of one time-mix head; must equal dim_att / "
        "num_attention_heads (derived when unset).")
    ffn_dim: int | None = key(
        None, "RWKV layers: channel-mix width (derived: intermediate_size, else expansion_factor "
        "x hidden_size, rounded down to a multiple of 32).")
    gmlp_attn_dim: int = key(64, "aMLP layers: width of the one-head tiny attention.")
    moe_num_experts: int = key(
        1, "Experts per mixture-of-experts layer; 1 means dense MLPs everywhere.")
    moe_top_k: int = key(1, "Experts each token is sent to.")
    moe_router_type: Literal["sinkhorn", "topk"] = key(
        "sinkhorn", "Router: 'topk' (softmax over the k largest logits) or 'sinkhorn' (in "
        "training, experts chosen on Sinkhorn-balanced scores; weights from a sigmoid for k=1, "
        "a softmax otherwise).")
    moe_expert_interval: int = key(
        1, "Every n-th layer is a mixture-of-experts layer (layers whose 0-based index is a "
        "multiple of n).")
    moe_lbl_in_fp32: bool = key(False, "Compute the router's auxiliary losses in fp32.")
    moe_jitter_eps: float | None = key(
        None, "Multiply the router input by uniform noise in [1 - eps, 1 + eps] in training; "
        "unset for none.")
    moe_aux_loss_coeff: float = key(
        0.0, "Coefficient of the load-balancing loss E * sum_e f_e * P_e (Switch/GShard), "
        "added to the training loss.", origin="Meg")
    moe_z_loss_coeff: float = key(
        0.0, "Coefficient of the router z-loss mean(logsumexp(logits)^2), added to the training "
        "loss.", origin="Meg")
    moe_token_dropping: bool = key(
        False, "Drop the tokens past each expert's capacity (moe_train_capacity_factor); "
        "false routes every token (dropless).")
    moe_train_capacity_factor: float = key(
        1.0, "With token dropping: capacity = factor x tokens x top_k / experts in training.")
    moe_eval_capacity_factor: float = key(
        1.0, "With token dropping: the capacity factor outside training.")
    moe_min_capacity: int = key(4, "With token dropping: the least capacity of an expert.")
    moe_type: Literal["megablocks", "deepspeed"] = key(
        "megablocks", "GPT-NeoX's MoE implementation switch; both select this framework's MoE "
        "block (dropping is moe_token_dropping).",
        hint="both values select the same MoE block here (routing and dropping follow the "
        "moe_* keys), so the implementation switch changes nothing")
    moe_grouped_gemm: bool = key(
        False, "Run the experts' matmuls through torch._grouped_mm where the device supports "
        "it (same numbers as the default per-expert loop).", origin="Meg")
    enable_expert_tensor_parallelism: bool = key(
        False, "Split every expert over the tensor-parallel group like the dense MLP; by default "
        "each tensor-parallel rank holds its experts whole.")


def attention_layer_types(attention_config: Any, num_layers: int) -> list[str]:
    """Expand ``[[["global", "local"], 4], ...]`` into one attention type per layer.

    ``"all"`` as a count means every layer. Raises ``ValueError`` when the counts do not add up
    to ``num_layers``.
    """
    if attention_config is None:
        return ["global"] * num_layers
    out: list[str] = []
    for entry in attention_config:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"entries look like [[types], count], got {entry!r}")
        kinds, count = entry
        if isinstance(kinds, str):
            kinds = [kinds]
        if count == "all":
            count = num_layers
        if not isinstance(count, int) or count < 0 or not kinds:
            raise ValueError(f"bad entry {entry!r}")
        for i in range(count):
            out.append(str(kinds[i % len(kinds)]))
    if len(out) != num_layers:
        raise ValueError(f"describes {len(out)} layers but num_layers is {num_layers}")
    return out


def mlp_projection_widths(model: ModelArgs, activation: str) -> tuple[int, int]:
    """GPT-NeoX's two MLP widths: ``(output of the first projection, input of the second)``.

    The base width is ``intermediate_size``, else ``expansion_factor x hidden_size``, else
    ``4 x hidden_size``. Gated activations take 2/3 of it for the first projection (both
    halves together) and half of that for the second. The first is then rounded up to a
    multiple of ``2 x mlp_multiple_of`` and the second to a multiple of ``mlp_multiple_of``.
    The two agree (first = 2 x second when gated, equal otherwise) for every model GPT-NeoX
    can build; see :func:`mlp_width`.
    """
    assert model.hidden_size is not None
    if model.intermediate_size:
        base = model.intermediate_size
    elif model.expansion_factor:
        base = int(model.expansion_factor * model.hidden_size)
    else:
        base = 4 * model.hidden_size
    first, second = base, base
    if activation in GATED_ACTIVATIONS:
        first = int(base * 2 / 3)
        second = first // 2
    multiple = max(1, model.mlp_multiple_of)
    first = 2 * multiple * -(-first // (2 * multiple))
    second = multiple * -(-second // multiple)
    return first, second


def mlp_bias(model: ModelArgs) -> bool:
    """Whether the MLP projections have biases: ``use_bias_in_mlp``, except that GPT-NeoX's
    legacy Llama MLP (``mlp_type: llama``) never has them."""
    return model.use_bias_in_mlp and model.mlp_type != "llama"


#: What GPT-NeoX's legacy Llama MLP (``mlp_type: llama``) rounds its width to.
LEGACY_LLAMA_MULTIPLE_OF = 256


def legacy_llama_width(model: ModelArgs, multiple_of: int = LEGACY_LLAMA_MULTIPLE_OF) -> int:
    """Per-half width of ``mlp_type: llama`` MLPs, GPT-NeoX's rule: ``intermediate_size`` as
    is, else ``8/3 x hidden_size`` rounded up to a multiple of 256 whatever
    ``mlp_multiple_of`` says (``4 x hidden_size`` for plain activations). Mixture-of-experts
    experts (:func:`moe_expert_width`) round to ``mlp_multiple_of`` instead."""
    if model.intermediate_size is not None:
        return model.intermediate_size
    assert model.hidden_size is not None
    if model.activation in GATED_ACTIVATIONS:
        multiple = max(1, multiple_of)
        return multiple * -(-int(2 * 4 * model.hidden_size / 3) // multiple)
    return 4 * model.hidden_size


def mlp_width(model: ModelArgs, activation: str) -> int:
    """Width of the dense MLP's hidden layer (of each half for gated activations).

    GPT-NeoX's rule (:func:`mlp_projection_widths`): the input width of the second projection.
    Where GPT-NeoX's first projection disagrees with it (GPT-NeoX then fails at its first
    forward pass; config validation warns), the first projection is built to match. The legacy
    ``mlp_type: llama`` switch keeps GPT-NeoX's old Llama MLP rule (:func:`legacy_llama_width`).
    """
    if model.mlp_type == "llama":
        return legacy_llama_width(model)
    return mlp_projection_widths(model, activation)[1]


def moe_expert_width(model: ModelArgs) -> int:
    """Width of one mixture-of-experts expert (each half when gated): ``intermediate_size`` as
    is, as GPT-NeoX's grouped expert MLPs take it, else ``8/3 x hidden_size`` rounded up to
    ``mlp_multiple_of`` (``4 x hidden_size`` for plain activations)."""
    return legacy_llama_width(model, model.mlp_multiple_of)


# widths of the layers without attention (docs/ssm.md)
def mamba_inner_width(model: ModelArgs) -> int:
    assert model.hidden_size is not None
    return int((model.expansion_factor or 2) * model.hidden_size)


def mamba_dt_rank(model: ModelArgs) -> int:
    assert model.hidden_size is not None
    return math.ceil(model.hidden_size / 16)


def rwkv_dims(model: ModelArgs) -> tuple[int, int, int]:
    """``(dim_att, head_size, ffn_dim)`` of an RWKV layer."""
    assert model.hidden_size is not None and model.num_attention_heads is not None
    dim_att = model.dim_att or model.hidden_size
    head_size = model.head_size or dim_att // model.num_attention_heads
    if model.ffn_dim:
        ffn = model.ffn_dim
    elif model.intermediate_size:
        ffn = model.intermediate_size
    else:
        ffn = int((model.expansion_factor or 3.5) * model.hidden_size)
    return dim_att, head_size, ffn // 32 * 32


def gmlp_width(model: ModelArgs) -> int:
    assert model.hidden_size is not None
    return int((model.expansion_factor or 4) * model.hidden_size)


def is_moe_layer(model: ModelArgs, layer: int) -> bool:
    """Whether transformer layer ``layer`` (0-based depth) is a mixture-of-experts layer."""
    return model.moe_num_experts > 1 and layer % max(1, model.moe_expert_interval) == 0
