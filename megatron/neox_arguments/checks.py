"""Cross-key checks of a resolved config, and checks against the machine the ranks run on.

``check_config`` covers what is wrong wherever the job runs. ``check_machine`` covers facts
about the launch target (GPUs, files); they are errors when launching and warnings in a dry
run, which may plan a launch for another machine.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.model.args import (
    ATTENTION_TYPES,
    GATED_ACTIVATIONS,
    MIXER_TYPES,
    SPARSE_ATTENTION_TYPES,
    attention_layer_types,
    is_moe_layer,
    mlp_projection_widths,
    mlp_width,
    moe_expert_width,
)
from megatron.neox_arguments import checks_training as training_checks
from megatron.neox_arguments.checks_input import check_values
from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.groups_model import expert_parallel_size

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig
    from megatron.neox_arguments.resolve import Locator, RunFacts

NEEDS_VOCAB = ("GPT2BPETokenizer", "HFGPT2Tokenizer", "HFTokenizer", "SPMTokenizer",
               "TiktokenTokenizer")


def _ranges(cfg: NeoXConfig, loc: Locator) -> None:
    at_least_one = {
        "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
        "num_attention_heads": cfg.model.num_attention_heads,
        "num_kv_heads": cfg.model.num_kv_heads, "seq_length": cfg.model.seq_length,
        "max_position_embeddings": cfg.model.max_position_embeddings,
        "make_vocab_size_divisible_by": cfg.model.make_vocab_size_divisible_by,
        "mlp_multiple_of": cfg.model.mlp_multiple_of,
        "intermediate_size": cfg.model.intermediate_size,
        "checkpoint_num_layers": cfg.act_ckpt.checkpoint_num_layers,
        "train_iters": cfg.training.train_iters, "train_epochs": cfg.training.train_epochs,
        "eval_interval": cfg.training.eval_interval, "log_interval": cfg.logging.log_interval,
        "save_interval": cfg.checkpoint.save_interval,
        "keep_last_n_checkpoints": cfg.checkpoint.keep_last_n_checkpoints,
        "exit_interval": cfg.training.exit_interval,
        "num_unique_layers": cfg.model.num_unique_layers,
        "max_consecutive_skipped_iters": cfg.training.max_consecutive_skipped_iters,
        "rpe_num_buckets": cfg.model.rpe_num_buckets,
        "lr_decay_iters": cfg.lr.lr_decay_iters,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise loc.error(name, message=f"must be at least 1, got {value}")
    not_negative = {
        "eval_iters": cfg.training.eval_iters, "min_lr": cfg.lr.min_lr,
        "weight_decay": cfg.optim.weight_decay, "init_method_std": cfg.model.init_method_std,
        "gradient_clipping": cfg.training.gradient_clipping, "num_workers": cfg.data.num_workers,
        "iteration": cfg.training.iteration,
    }
    for name, value in not_negative.items():
        if value is not None and value < 0:
            raise loc.error(name, message=f"must not be negative, got {value}")
    fractions = {
        "attention_dropout": (cfg.model.attention_dropout, False),
        "hidden_dropout": (cfg.model.hidden_dropout, False),
        "warmup": (cfg.lr.warmup, True), "rotary_pct": (cfg.model.rotary_pct, True),
        "lr_decay_fraction": (cfg.lr.lr_decay_fraction, True),
    }
    for name, (value, closed) in fractions.items():
        if value is None:
            continue
        if value < 0 or value > 1 or (value == 1 and not closed):
            bound = "[0, 1]" if closed else "[0, 1)"
            raise loc.error(name, message=f"must be in {bound}, got {value}")
    if cfg.model.pos_emb == "rotary" and cfg.model.rotary_pct == 0:
        raise loc.error("rotary_pct", message="must be above 0 with pos_emb: rotary")


def _model(cfg: NeoXConfig, loc: Locator) -> None:
    m, mp = cfg.model, cfg.parallelism.model_parallel_size
    hidden, heads, kv = m.hidden_size, m.num_attention_heads, m.num_kv_heads
    assert hidden is not None and heads is not None and kv is not None
    if hidden % heads:
        raise loc.error("hidden_size", "num_attention_heads", message=(
            f"hidden_size {hidden} is not divisible by num_attention_heads {heads}"))
    if heads % kv:
        raise loc.error("num_kv_heads", message=(
            f"num_attention_heads {heads} is not divisible by num_kv_heads {kv}"))
    if heads % mp:
        raise loc.error("num_attention_heads", "model_parallel_size", message=(
            f"num_attention_heads {heads} is not divisible by model_parallel_size {mp}"))
    if kv % mp:
        raise loc.error("num_kv_heads", "model_parallel_size", message=(
            f"num_kv_heads {kv} is not divisible by model_parallel_size {mp}"))
    assert m.seq_length is not None and m.max_position_embeddings is not None
    if m.max_position_embeddings < m.seq_length:
        raise loc.error("max_position_embeddings", "seq_length", message=(
            f"max_position_embeddings {m.max_position_embeddings} is smaller than "
            f"seq_length {m.seq_length}"))
    head_dim = hidden // heads
    if m.pos_emb == "rotary":
        rotary_dims = int(head_dim * m.rotary_pct)
        if rotary_dims < 2 or rotary_dims % 2:
            raise loc.error("rotary_pct", message=(
                f"rotates {rotary_dims} of {head_dim} head dimensions; needs an even number "
                "of at least 2"))
    width = mlp_width(m, m.activation)
    dense = _has_dense_mlp(cfg)
    if dense and m.mlp_type != "llama" and m.intermediate_size is not None \
            and m.expansion_factor is not None:
        raise loc.error("intermediate_size", "expansion_factor", message=(
            "the transformer MLP takes either intermediate_size or expansion_factor, not both "
            "(as in GPT-NeoX)"))
    if dense and width % mp:
        how = "intermediate_size" if m.intermediate_size is not None else \
            "the MLP width derived from hidden_size"
        raise loc.error("intermediate_size", "model_parallel_size", "hidden_size", message=(
            f"{how} ({width}) is not divisible by model_parallel_size {mp}; set "
            "intermediate_size or mlp_multiple_of"))
    assert m.num_layers is not None
    if m.num_unique_layers is not None:
        if m.num_layers % m.num_unique_layers:
            raise loc.error("num_unique_layers", message=(
                f"num_layers {m.num_layers} is not a multiple of num_unique_layers "
                f"{m.num_unique_layers}"))
        if cfg.parallelism.is_pipe_parallel:
            raise loc.error("num_unique_layers", message=(
                "layer sharing needs pipe_parallel_size: 0 (layers cannot be shared across "
                "pipeline stages)"))
    try:
        kinds = attention_layer_types(m.attention_config, m.num_layers)
    except ValueError as exc:
        raise loc.error("attention_config", message=str(exc)) from None
    for kind in sorted(set(kinds)):
        if kind in SPARSE_ATTENTION_TYPES:
            raise loc.error("attention_config", message=(
                f"{kind!r} attention needs DeepSpeed's GPU sparse-attention kernels (triton), "
                f"which are not available; use one of {', '.join(ATTENTION_TYPES)}"))
        if kind not in ATTENTION_TYPES:
            raise loc.error("attention_config", message=(
                f"unknown attention type {kind!r}; choose from "
                f"{', '.join(ATTENTION_TYPES)}"))
    if "local" in kinds and m.sliding_window_width is None:
        raise loc.error("sliding_window_width", message="required by 'local' attention layers")
    _mixer_layers(cfg, loc, set(kinds))


def _has_dense_mlp(cfg: NeoXConfig) -> bool:
    """Whether some layer has the dense transformer MLP (not a layer without attention, not
    a mixture-of-experts layer)."""
    m = cfg.model
    assert m.num_layers is not None
    try:
        kinds = attention_layer_types(m.attention_config, m.num_layers)
    except ValueError:
        return True
    return any(kind not in MIXER_TYPES and not is_moe_layer(m, depth)
               for depth, kind in enumerate(kinds))


def mlp_warnings(cfg: NeoXConfig) -> list[str]:
    """A dense MLP whose two GPT-NeoX widths disagree (GPT-NeoX fails on it at the first
    forward pass; this framework builds both projections for the second width)."""
    m = cfg.model
    if m.mlp_type == "llama" or not _has_dense_mlp(cfg):
        return []
    first, second = mlp_projection_widths(m, m.activation)
    halves = 2 if m.activation in GATED_ACTIVATIONS else 1
    if first == halves * second:
        return []
    keys = "intermediate_size" if m.intermediate_size else \
        "expansion_factor" if m.expansion_factor else "hidden_size"
    return [f"{keys}/mlp_multiple_of: GPT-NeoX rounds the MLP's first projection to {first} "
            f"and the second one's input to {second}, which do not fit together (GPT-NeoX "
            f"fails on this model); this run builds the MLP {second} wide"
            f"{' per half' if halves == 2 else ''}. Set intermediate_size to 3 x the width "
            "you want for gated activations, or mlp_multiple_of so that both agree."]


def _mixer_layers(cfg: NeoXConfig, loc: Locator, kinds: set[str]) -> None:
    """The layer types without attention: Mamba, RWKV, gMLP/aMLP."""
    m, mp = cfg.model, cfg.parallelism.model_parallel_size
    assert m.hidden_size is not None and m.num_attention_heads is not None
    no_tp = sorted(kinds & {"rwkv", "gmlp", "amlp"})
    if no_tp and mp > 1:
        raise loc.error("attention_config", "model_parallel_size", message=(
            f"{', '.join(no_tp)} layers do not support tensor parallelism (as in GPT-NeoX); "
            f"use model_parallel_size 1, got {mp}"))
    if "mamba" in kinds:
        if m.mamba_inner_func_fusion and m.mamba_use_bias_in_linears:
            raise loc.error("mamba_inner_func_fusion", "mamba_use_bias_in_linears", message=(
                "the fused Mamba inner function has no biases in its projections; turn one of "
                "the two off"))
        if m.mamba_selective_fp32_params and cfg.precision.precision in ("bfloat16", "fp16"):
            raise loc.error("mamba_selective_fp32_params", "precision", message=(
                f"A_log and D cannot stay fp32 parameters in {cfg.precision.precision} "
                "training here: DeepSpeed's engine casts every parameter to the training dtype "
                "(it keeps only buffers in fp32); set mamba_selective_fp32_params: false (they "
                "train with fp32 master weights and the scan runs in fp32)"))
        inner = int((m.expansion_factor or 2) * m.hidden_size)
        if inner % mp:
            raise loc.error("expansion_factor", "model_parallel_size", message=(
                f"the Mamba inner width {inner} is not divisible by model_parallel_size {mp}"))
    if "rwkv" in kinds:
        dim_att = m.dim_att or m.hidden_size
        for name, value in (("hidden_size", m.hidden_size), ("dim_att", dim_att)):
            if value % 32:
                raise loc.error(name, message=(
                    f"RWKV layers need a multiple of 32, got {value}"))
        if dim_att % m.num_attention_heads:
            raise loc.error("dim_att", "num_attention_heads", message=(
                f"dim_att {dim_att} is not divisible by num_attention_heads "
                f"{m.num_attention_heads}"))
        if m.head_size is not None and m.head_size * m.num_attention_heads != dim_att:
            raise loc.error("head_size", message=(
                f"head_size {m.head_size} x num_attention_heads {m.num_attention_heads} must "
                f"equal dim_att {dim_att}"))
        if m.intermediate_size is not None and m.expansion_factor is not None:
            raise loc.error("intermediate_size", "expansion_factor", message=(
                "RWKV layers take either intermediate_size or expansion_factor, not both"))
        ffn = m.ffn_dim or m.intermediate_size or int((m.expansion_factor or 3.5) * m.hidden_size)
        if ffn < 32:
            raise loc.error("ffn_dim", message=(
                f"the RWKV channel-mix width {ffn} rounds down to 0 (multiple of 32)"))


def _moe(cfg: NeoXConfig, loc: Locator) -> None:
    m, p = cfg.model, cfg.parallelism
    ep = expert_parallel_size(p)
    if p.expert_model_parallel_size != 1 and p.moe_expert_parallel_size not in (
            1, p.expert_model_parallel_size):
        raise loc.error("expert_model_parallel_size", "moe_expert_parallel_size", message=(
            f"{p.expert_model_parallel_size} and {p.moe_expert_parallel_size} disagree; set "
            "one of them"))
    if m.moe_num_experts < 1:
        raise loc.error("moe_num_experts", message=f"must be at least 1, got {m.moe_num_experts}")
    if m.moe_num_experts == 1:
        if ep != 1:
            name = "expert_model_parallel_size" if p.expert_model_parallel_size != 1 \
                else "moe_expert_parallel_size"
            raise loc.error(name, "moe_num_experts", message=(
                f"expert parallelism {ep} needs mixture-of-experts layers (moe_num_experts > 1)"))
        return
    if not 1 <= m.moe_top_k <= m.moe_num_experts:
        raise loc.error("moe_top_k", message=(
            f"{m.moe_top_k} must be between 1 and moe_num_experts {m.moe_num_experts}"))
    if m.moe_expert_interval < 1:
        raise loc.error("moe_expert_interval", message=(
            f"must be at least 1, got {m.moe_expert_interval}"))
    for name in ("moe_train_capacity_factor", "moe_eval_capacity_factor"):
        if getattr(m, name) <= 0:
            raise loc.error(name, message=f"must be positive, got {getattr(m, name)}")
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        if getattr(m, name) < 0:
            raise loc.error(name, message=f"must not be negative, got {getattr(m, name)}")
    expert = moe_expert_width(m)
    if m.enable_expert_tensor_parallelism and expert % p.model_parallel_size:
        raise loc.error("intermediate_size", "model_parallel_size", message=(
            f"the expert width {expert} is not divisible by model_parallel_size "
            f"{p.model_parallel_size}"))
    if m.moe_jitter_eps is not None and not 0 <= m.moe_jitter_eps < 1:
        raise loc.error("moe_jitter_eps", message=f"must be in [0, 1), got {m.moe_jitter_eps}")
    name = "expert_model_parallel_size" if p.expert_model_parallel_size != 1 \
        else "moe_expert_parallel_size"
    if ep < 1 or p.data_parallel_size % ep:
        raise loc.error(name, message=(
            f"{ep} must divide the data-parallel size {p.data_parallel_size}"))
    if m.moe_num_experts % ep:
        raise loc.error(name, "moe_num_experts", message=(
            f"moe_num_experts {m.moe_num_experts} is not divisible by expert parallelism {ep}"))
    if int((cfg.ds.zero_optimization or {}).get("stage", 0)) == 3:
        raise loc.error("zero_optimization", "moe_num_experts", message=(
            "mixture-of-experts layers work with ZeRO stages 0-2; use stage 2 or lower"))


def _parallel(cfg: NeoXConfig, loc: Locator) -> None:
    p = cfg.parallelism
    stages = max(p.pipe_parallel_size, 1)
    assert cfg.model.num_layers is not None
    if cfg.model.num_layers < stages:
        raise loc.error("num_layers", "pipe_parallel_size", message=(
            f"num_layers {cfg.model.num_layers} is fewer than the {stages} pipeline stages"))
    method = p.pipe_partition_method
    if method.startswith("type:"):
        try:
            re.compile(method[len("type:"):], re.IGNORECASE)
        except re.error as exc:
            raise loc.error("pipe_partition_method", message=f"bad regex ({exc})") from None
    elif method not in ("parameters", "uniform"):
        raise loc.error("pipe_partition_method", message=(
            f"{method!r}: use 'parameters', 'uniform' or 'type:<regex>'"))
    zero = cfg.ds.zero_optimization or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise loc.error("zero_optimization", message=f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage >= 2 and p.is_pipe_parallel:
        raise loc.error("zero_optimization", "pipe_parallel_size", message=(
            f"ZeRO stage {stage} cannot be combined with pipeline parallelism "
            f"(pipe_parallel_size {p.pipe_parallel_size}); use stage 0 or 1, or "
            "pipe_parallel_size: 0"))
    _check_zero_block(zero, loc)


def _check_zero_block(zero: dict[str, Any], loc: Locator) -> None:
    """Let DeepSpeed's own schema check the ZeRO block's keys before any rank starts."""
    if not zero:
        return
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # deepspeed missing: the launcher reports that itself
        return
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as exc:  # pydantic.ValidationError
        errors = getattr(exc, "errors", None)
        if callable(errors) and errors():
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise loc.error("zero_optimization", message=(
                f"{where}: {first.get('msg', 'invalid')}")) from None
        raise loc.error("zero_optimization", message=str(exc).splitlines()[0]) from None


def _data(cfg: NeoXConfig, loc: Locator, purpose: str | None) -> None:
    d = cfg.data
    if d.pack_impl == "pack_until_overflow":
        raise loc.error("pack_impl", message=(
            "'pack_until_overflow' (whole documents packed until the next one overflows) is not "
            "provided; use packed or unpacked"))
    if d.data_impl == "cached":
        raise loc.error("data_impl", message=(
            "'cached' (the legacy in-memory indexed format) is not provided; datasets here are "
            "memory-mapped, as the preprocessing tools write them: use mmap or infer"))
    if d.data_path and d.train_data_paths:
        raise loc.error("data_path", "train_data_paths", message=(
            "set either data_path (with split) or train_data_paths, not both"))
    for split in ("train", "valid", "test"):
        paths = getattr(d, f"{split}_data_paths")
        weights = getattr(d, f"{split}_data_weights")
        labels = getattr(d, f"{split}_label_data_paths")
        if weights is not None and (paths is None or len(weights) != len(paths)):
            raise loc.error(f"{split}_data_weights", message=(
                f"has {len(weights)} weights for {len(paths or [])} {split}_data_paths"))
        if weights is not None and any(w < 0 for w in weights):
            raise loc.error(f"{split}_data_weights", message="weights must not be negative")
        if labels is not None and (paths is None or len(labels) != len(paths)):
            raise loc.error(f"{split}_label_data_paths", message=(
                f"has {len(labels)} entries for {len(paths or [])} {split}_data_paths"))
    parts = [p for p in d.split.replace(" ", "").split(",") if p]
    try:
        split_weights = [float(p) for p in parts]
    except ValueError:
        raise loc.error("split", message=f"{d.split!r} is not comma-separated numbers") from None
    if not 1 <= len(split_weights) <= 3 or any(w < 0 for w in split_weights) \
            or sum(split_weights) <= 0:
        raise loc.error("split", message=f"{d.split!r}: give up to three non-negative weights")
    if purpose == "train" and not (d.data_path or d.train_data_paths) \
            and d.dataset_impl != "pairwise":
        raise loc.error("data_path", message="training needs data_path or train_data_paths")
    tok = cfg.tokenizer
    if purpose is None:  # a config checked without a job (tools, tests): files may come later
        return
    if tok.tokenizer_type in NEEDS_VOCAB and not tok.vocab_file:
        raise loc.error("tokenizer_type", message=f"{tok.tokenizer_type} needs vocab_file")
    if tok.tokenizer_type == "GPT2BPETokenizer" and not tok.merge_file:
        raise loc.error("tokenizer_type", message=f"{tok.tokenizer_type} needs merge_file")
    if purpose == "generate" and cfg.textgen.text_gen_type == "input-file" \
            and not cfg.textgen.sample_input_file:
        raise loc.error("sample_input_file", "text_gen_type", message=(
            "required by text_gen_type: input-file"))


def _compile(cfg: NeoXConfig, loc: Locator) -> None:
    """torch_compile / fp8_training against the layouts and precisions they work with."""
    p = cfg.precision
    name = "fp8_training" if p.fp8_training else "torch_compile"
    if not (p.torch_compile or p.fp8_training):
        return
    if cfg.parallelism.is_pipe_parallel:
        raise loc.error(name, "pipe_parallel_size", message=(
            f"is not implemented for pipeline parallelism (pipe_parallel_size "
            f"{cfg.parallelism.pipe_parallel_size}): only the layers of the plain model are "
            "compiled; use pipe_parallel_size: 0"))
    if int((cfg.ds.zero_optimization or {}).get("stage", 0)) == 3:
        raise loc.error(name, "zero_optimization", message=(
            "is not available with ZeRO stage 3, whose parameter gathering runs in module hooks "
            "inside the compiled layers; use ZeRO stage 0, 1 or 2"))
    if p.fp8_training and p.precision != "bfloat16":
        raise loc.error("fp8_training", "precision", message=(
            f"needs bf16 (the weights and the non-FP8 ops stay bf16), precision is "
            f"{p.precision}; set bf16: {{enabled: true}}"))
    tokens = (cfg.training.train_micro_batch_size_per_gpu or 1) * (cfg.model.seq_length or 1)
    if p.fp8_training and tokens % 16:
        raise loc.error("fp8_training", "train_micro_batch_size_per_gpu", "seq_length", message=(
            f"needs the tokens of a micro batch (micro batch x seq_length = {tokens}) to be a "
            "multiple of 16 (FP8 matrix multiplications)"))


def check_config(cfg: NeoXConfig, loc: Locator, purpose: str | None) -> None:
    """Raise ConfigError for anything that is wrong wherever the job runs."""
    _ranges(cfg, loc)
    training_checks.scheduler(cfg, loc)
    training_checks.act_ckpt(cfg, loc)
    check_values(cfg, loc, purpose)
    _model(cfg, loc)
    _parallel(cfg, loc)
    _moe(cfg, loc)
    _compile(cfg, loc)
    _data(cfg, loc, purpose)
    training_checks.post_training(cfg, loc, purpose)
    training_checks.observability(cfg, loc)


def _dataset_files(prefix: str) -> list[str]:
    return [prefix + ".bin", prefix + ".idx"]


def check_machine(cfg: NeoXConfig, loc: Locator, facts: RunFacts) -> list[str]:
    """Problems with the launch target: errors when launching, warnings in a dry run."""
    problems: list[tuple[tuple[str, ...], str]] = []
    if cfg.precision.precision == "fp16" and not facts.gpu:
        problems.append((("precision", "fp16"), "fp16 needs GPUs, and the ranks of this launch "
                         "are CPU ranks; use bf16 or fp32"))
    if cfg.precision.fp8_training and not facts.gpu and facts.purpose == "train":
        problems.append((("fp8_training",), "needs GPUs with FP8 tensor cores (compute "
                         "capability 8.9+: Ada, Hopper), and the ranks of this launch are CPU "
                         "ranks; use bf16 without fp8_training"))
    if cfg.precision.torch_compile and cfg.precision.precision != "fp32" and not facts.gpu \
            and facts.purpose == "train":
        problems.append((("torch_compile", "precision"), "on CPU ranks needs fp32: torch's CPU "
                         "code generator fails on some 16-bit kernels of these models (the "
                         "shared bias gradients of gpt_j_residual in bf16); compile in bf16 on "
                         "GPUs"))
    if cfg.other.distributed_backend == "nccl" and not facts.gpu:
        problems.append((("distributed_backend",), "nccl needs GPUs, and the ranks of this "
                         "launch are CPU ranks; use gloo (or leave it unset)"))
    te_on = [f.name for f in dataclasses.fields(cfg.precision) if f.name.startswith("te_")
             and getattr(cfg.precision, f.name) != f.default]
    if te_on and not facts.gpu and facts.purpose == "train":
        problems.append(((te_on[0],), "Transformer Engine modules need GPU ranks (with the "
                         "transformer_engine package), and the ranks of this launch are CPU "
                         "ranks; unset the te_* keys"))
    if cfg.logging.memory_profiling and not facts.gpu and facts.purpose == "train":
        problems.append((("memory_profiling",), "records the CUDA allocator's history and "
                         "needs CUDA ranks; the ranks of this launch are CPU ranks (use "
                         "profile for a CPU trace)"))
    if cfg.optim.optimizer_type == "OneBitAdam" and not facts.gpu:
        problems.append((("optimizer",), "OneBitAdam needs GPUs (DeepSpeed's 1-bit "
                         "communication); use Adam or AdamW on CPU ranks"))
    elif cfg.optim.optimizer_type == "OneBitAdam" and cfg.other.distributed_backend == "gloo":
        problems.append((("optimizer", "distributed_backend"), "OneBitAdam needs the nccl "
                         "backend (DeepSpeed's 1-bit communication); unset distributed_backend "
                         "or use Adam or AdamW"))
    if facts.purpose == "train":
        d = cfg.data
        prefixes: list[tuple[str, str]] = []
        if d.data_path:
            prefixes.append(("data_path", d.data_path))
        for split in ("train", "valid", "test"):
            for key_name in (f"{split}_data_paths", f"{split}_label_data_paths"):
                prefixes += [(key_name, p) for p in getattr(d, key_name) or []]
        for key_name, prefix in prefixes:
            missing = [f for f in _dataset_files(prefix) if not Path(f).is_file()]
            if missing:
                problems.append(((key_name,), f"dataset file {missing[0]} not found"))
    if facts.purpose in ("train", "generate", "eval"):
        tok = cfg.tokenizer
        for key_name in ("vocab_file", "merge_file"):
            path = getattr(tok, key_name)
            if path and not Path(path).exists():
                problems.append(((key_name,), f"file {path} not found"))
    messages = [str(loc.error(*names, message=msg)) for names, msg in problems]
    if messages and facts.launching:
        raise ConfigError(messages[0])
    return messages
