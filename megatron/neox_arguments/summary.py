"""Human-readable summaries of a resolved config for the dry run and the run log."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from megatron.model.args import is_moe_layer
from megatron.model_size import active_parameter_count, parameter_count
from megatron.neox_arguments.config import padded_vocab_size
from megatron.neox_arguments.deepspeed_config import build_deepspeed_config
from megatron.neox_arguments.groups_model import expert_parallel_size
from megatron.neox_arguments.schema import KEYS

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig

GPT2_VOCAB = 50257


def overrides_lines(cfg: NeoXConfig) -> list[str]:
    if not cfg.merged.overrides:
        return ["overridden keys: none"]
    return ["overridden keys (later file wins):"] + [
        "  " + o.describe() for o in cfg.merged.overrides
    ]


def hint_lines(cfg: NeoXConfig) -> list[str]:
    """One line per speed-hint key set to a value other than its default: the key is accepted
    and changes nothing here, and the line says why."""
    lines = []
    for spec in KEYS.values():
        if spec.hint and cfg.get(spec.name) != spec.default:
            lines.append(f"note: {spec.name} is a speed hint with no effect here: {spec.hint}")
    return lines


def summary_lines(cfg: NeoXConfig) -> list[str]:
    p, m, t = cfg.parallelism, cfg.model, cfg.training
    vocab = cfg.tokenizer.padded_vocab_size
    vocab_note = ""
    if vocab is None:
        vocab = padded_vocab_size(GPT2_VOCAB, m.make_vocab_size_divisible_by,
                                  p.model_parallel_size)
        vocab_note = " (assuming a GPT-2 sized vocabulary)"
    params = parameter_count(m, vocab)
    stages = max(p.pipe_parallel_size, 1)
    lines = [
        "config files: " + ", ".join(cfg.merged.files),
        *overrides_lines(cfg),
        f"ranks: {p.world_size} = pipeline {stages} x tensor {p.model_parallel_size} x data "
        f"{p.data_parallel_size}" + (" (pipeline engine)" if p.is_pipe_parallel else ""),
        f"batch: {t.train_batch_size} samples = micro {t.train_micro_batch_size_per_gpu} x "
        f"accumulation {t.gradient_accumulation_steps} x data {p.data_parallel_size}; "
        f"{(t.train_batch_size or 0) * (m.seq_length or 0):,} tokens per step",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads} "
        f"(kv {m.num_kv_heads}), seq {m.seq_length}, {m.pos_emb} positions, {m.norm}, "
        f"{m.activation}; {params / 1e6:,.1f}M parameters with vocab {vocab}{vocab_note}",
        f"precision: {cfg.precision.precision}; optimizer {cfg.optim.optimizer_type} lr "
        f"{cfg.optim.lr} ({cfg.lr.lr_decay_style} decay, warmup {cfg.lr.warmup}); ZeRO stage "
        f"{(cfg.ds.zero_optimization or {}).get('stage', 0)}",
        f"training: {t.train_iters} iterations, eval every {t.eval_interval} for "
        f"{t.eval_iters}, save {cfg.checkpoint.save} every {cfg.checkpoint.save_interval}",
        "deepspeed config: " + json.dumps(build_deepspeed_config(cfg), sort_keys=True),
    ]
    if m.moe_num_experts > 1:
        moe_layers = sum(1 for d in range(m.num_layers or 0) if is_moe_layer(m, d))
        lines.insert(5, (
            f"mixture of experts: {moe_layers} layers of {m.moe_num_experts} experts, top "
            f"{m.moe_top_k} ({m.moe_router_type}), expert parallel {expert_parallel_size(p)}; "
            f"{active_parameter_count(m, vocab) / 1e6:,.1f}M active parameters per token"))
    if cfg.logging.git_hash:
        lines.append(f"git hash: {cfg.logging.git_hash}")
    lines += hint_lines(cfg)
    lines += [f"warning: {w}" for w in cfg.warnings]
    return lines
