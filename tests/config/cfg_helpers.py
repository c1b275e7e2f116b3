"""Building resolved configs from a small base for the config tests."""

from __future__ import annotations

from typing import Any

from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

BASE: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 32,
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 10,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001}},
    "data_path": "data/none",
    "tokenizer_type": "CharLevelTokenizer",
}


def make_cfg(world_size: int = 1, gpu: bool = False, launching: bool = False,
             purpose: str | None = "train", **overrides: Any):
    values = {**BASE, **overrides}
    values = {k: v for k, v in values.items() if v is not None}
    merged = merge_configs([("a.yml", values)])
    return resolve_config(merged, RunFacts(world_size=world_size, gpu=gpu, launching=launching,
                                           purpose=purpose))
