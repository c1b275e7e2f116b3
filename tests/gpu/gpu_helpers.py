"""Shared pieces of the GPU suite: short trainer runs on one GPU and the results file that
``make gpu-check`` turns into its summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.training.e2e_helpers import (
    base_values,
    explain,
    losses,
    records,
    run_deepy,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("GPU_CHECK_RESULTS", ROOT / "runs" / "gpu-check" / "tests.jsonl"))

# A small GPT on one GPU: big enough for real kernels (flash attention needs head_dim % 8,
# FP8 GEMMs need multiples of 16), small enough to start in seconds.
MODEL: dict[str, Any] = {
    "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 256,
    "max_position_embeddings": 256, "pos_emb": "rotary", "norm": "layernorm",
    "no_weight_tying": True, "make_vocab_size_divisible_by": 64,
    "gpt_j_residual": True,  # Pythia's parallel residual (the 1.3B benchmark is sequential)
    "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
    "lr_decay_style": "constant", "warmup": 0.0, "weight_decay": 0.01,
    "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
    "seed": 1234,
}
BF16 = {"bf16": {"enabled": True}}


def record(name: str, **values: Any) -> None:
    """Append one measurement to the results file of this GPU check."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps({"name": name, **values}) + "\n")


def train(data_prefix: str, run_dir: Path, *, env: dict[str, str] | None = None,
          **extra: Any) -> dict[int, float]:
    """``deepy.py train.py`` on one rank; returns ``{iteration: loss}``."""
    values = base_values(data_prefix, run_dir, **{**MODEL, **extra})
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = write_config(run_dir / "config.yml", values)
    proc = run_deepy(cfg, overrides=["--num_gpus", "1"], env=env, timeout=540)
    assert proc.returncode == 0, explain(proc)
    return losses(run_dir)


# a model small enough for CPU ranks too (bf16 matmuls may be slow on the host CPU)
SMALL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
         "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 4}

# ranks on the CPU of the GPU machine (checkpoints moving between devices)
CPU_RANKS = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def max_relative_gap(a: dict[int, float], b: dict[int, float]) -> float:
    common = sorted(set(a) & set(b))
    assert common, (a, b)
    return max(abs(a[i] - b[i]) / abs(b[i]) for i in common)


__all__ = ["BF16", "CPU_RANKS", "MODEL", "SMALL", "ROOT", "explain", "max_relative_gap", "record", "records",
           "train"]
