"""Tiny models shared by the checkpoint tests: configs covering every kind of parameter (RPE
table, gated MLP, GQA, learned positions, query/key norms, saved rotary buffers) and a builder
for one tensor-parallel rank's shards without communication."""

from __future__ import annotations

from typing import Any

import torch

from megatron.model import GPTModel
from megatron.parallel import ParallelState
from tests.conversion.conversion_helpers import config_from_values, manual_state

__all__ = ["CONFIGS", "build", "config_from_values", "manual_state"]

CONFIGS: dict[str, dict[str, Any]] = {
    "llama_rpe_untied": dict(norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                             no_weight_tying=True, pos_emb="rpe", use_bias_in_mlp=True,
                             intermediate_size=48),
    "neox_tied": dict(activation="gelu", gpt_j_residual=True, rotary_pct=0.5),
    "learned_geglu": dict(pos_emb="learned", activation="geglu", use_qk_layernorm=True,
                          intermediate_size=48,
                          rotary_save_freqs_buffer=True),
}


def build(cfg: Any, tp_size: int = 1, tp_rank: int = 0, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    state = ParallelState.single() if tp_size == 1 else manual_state(tp_size, tp_rank)
    return GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                    state=state)
