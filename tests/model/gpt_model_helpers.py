"""Tiny configs, models and batches shared by the GPT model tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron.model import GPTModel
from megatron.neox_arguments import NeoXConfig, RunFacts, merge_configs, resolve_config
from megatron.neox_arguments.loader import read_config_file
from megatron.parallel import ParallelState, RNGStatesTracker

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 100
BASE: dict[str, Any] = {
    "num_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "seq_length": 16,
    "train_micro_batch_size_per_gpu": 2,
    "tokenizer_type": "CharLevelTokenizer",
    "make_vocab_size_divisible_by": 8,
}


def make_config(world_size: int = 1, **overrides: Any) -> NeoXConfig:
    merged = merge_configs([("test", {**BASE, **overrides})])
    facts = RunFacts(world_size=world_size, launching=False, purpose=None)
    return resolve_config(merged, facts).with_vocab_size(VOCAB)


def build(
    cfg: NeoXConfig,
    seed: int = 0,
    *,
    state: ParallelState | None = None,
    tracker: RNGStatesTracker | None = None,
    padded_vocab: int | None = None,
    sequence_parallel: bool | None = None,
) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(
        cfg.model, cfg.act_ckpt, padded_vocab_size=padded_vocab or cfg.tokenizer.padded_vocab_size,
        state=state or ParallelState.single(), tracker=tracker,
        sequence_parallel=sequence_parallel,
    )  # fmt: skip


def batch(
    batch_size: int = 2, seq: int = 16, seed: int = 1, vocab: int = VOCAB
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, labels, loss_mask)`` with a few masked positions."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, seq), generator=g)
    labels = torch.randint(0, vocab, (batch_size, seq), generator=g)
    loss_mask = (torch.rand(batch_size, seq, generator=g) > 0.2).float()
    return tokens, labels, loss_mask


def document_mask(tokens: torch.Tensor, boundaries: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A reset-attention mask ``[b, 1, s, s]`` (True = masked) and reset position ids for
    documents starting at ``boundaries`` (same for every sample)."""
    b, s = tokens.shape
    doc = torch.zeros(s, dtype=torch.long)
    for start in boundaries:
        doc[start:] += 1
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    mask = causal | (doc[:, None] != doc[None, :])
    starts = torch.tensor([max([0] + [x for x in boundaries if x <= i]) for i in range(s)])
    positions = torch.arange(s) - starts
    return mask.expand(b, 1, s, s).clone(), positions.expand(b, s).clone()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def load_tiny(name: str, world_size: int = 1, **overrides: Any) -> NeoXConfig:
    """``configs/<name>.yml`` with a tokenizer that needs no files, plus ``overrides``."""
    path = REPO_ROOT / "configs" / f"{name}.yml"
    merged = merge_configs([
        (str(path), read_config_file(path)),
        ("test", {"tokenizer_type": "CharLevelTokenizer", **overrides}),
    ])  # fmt: skip
    facts = RunFacts(world_size=world_size, launching=False, purpose=None)
    return resolve_config(merged, facts).with_vocab_size(VOCAB)
