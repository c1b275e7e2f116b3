"""Tiny random checkpoints and configs for the generation and evaluation tests.

Models use the CharLevelTokenizer (bytes as ids, eod 0, vocabulary 512), so no tokenizer
files are needed; their weights are drawn with a larger scale than the trainer's
initialization so that the logits are far from uniform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL: dict[str, Any] = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_kv_heads": 2,
    "seq_length": 48, "max_position_embeddings": 48, "norm": "rmsnorm", "pos_emb": "rotary",
    "activation": "swiglu", "intermediate_size": 48, "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False, "no_weight_tying": True, "make_vocab_size_divisible_by": 8,
    "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 2, "seed": 7,
    "hidden_dropout": 0.0, "attention_dropout": 0.0,
}  # fmt: skip


def resolved(values: dict[str, Any], world_size: int = 1) -> Any:
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

    merged = merge_configs([("test", values)])
    cfg = resolve_config(merged, RunFacts(world_size=world_size, purpose=None, launching=False))
    return cfg.with_vocab_size(512)


def random_model(values: dict[str, Any], seed: int = 0) -> Any:
    """A TP=1 ``GPTModel`` of ``values`` with random weights (std 0.3, norms near 1)."""
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = resolved({**values, "model_parallel_size": 1, "pipe_parallel_size": 0})
    torch.manual_seed(seed)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def tiny_checkpoint(root: Path, *, tp: int = 1, pp: int = 0, seed: int = 0,
                    **overrides: Any) -> tuple[Path, Path, Any]:
    """``(config.yml, checkpoint dir, TP=1 model)``: a random model written as a checkpoint
    with ``tp`` shards in the plain (``pp`` 0) or pipeline layout, and its config (which
    names the checkpoint as ``load``)."""
    from megatron.checkpoint.weights import write_checkpoint

    values = {**MODEL, **overrides}
    model = random_model(values, seed)
    ckpt = root / "ckpt"
    config = {**values, "model_parallel_size": tp, "pipe_parallel_size": pp, "load": str(ckpt)}
    path = root / "model.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    write_checkpoint(ckpt, model.state_dict(), model.model_args, tp_size=tp,
                     pipe_parallel_size=pp, config_yaml=path.read_text())
    return path, ckpt, model


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_script(*args: str | Path, timeout: float = 300, stdin: str | None = None,
               cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
                    HF_DATASETS_OFFLINE="1")
    full_env.pop("MASTER_PORT", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def check_run(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout
