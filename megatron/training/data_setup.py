"""Datasets, loaders and the sample budget for training, wired from the config sections."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron.data.data_utils import build_train_valid_test_datasets, get_train_valid_test_split_
from megatron.data.gpt2_dataset import check_token_ids
from megatron.data.indexed_dataset import make_dataset
from megatron.data.masks import prepare_lm_batch
from megatron.data.pairwise_dataset import build_post_training_datasets
from megatron.data.samplers import build_data_loader
from megatron.neox_arguments import ConfigError, NeoXConfig
from megatron.parallel.state import ParallelState


@dataclass(frozen=True)
class SampleBudget:
    """How many samples each split must provide, and the resulting iteration count."""

    train_iters: int
    train: int
    valid: int
    test: int


def unpacked_data(cfg: NeoXConfig) -> bool:
    """Whether samples are single documents (post-training data) rather than packed text."""
    d = cfg.data
    return d.dataset_impl == "pairwise" or d.pack_impl == "unpacked" \
        or cfg.posttrain.train_impl == "kto"


def _tokens_in_train_split(cfg: NeoXConfig) -> int:
    d = cfg.data
    if unpacked_data(cfg):  # one sample per document: count documents as samples
        paths = cfg.posttrain.pos_train_data_paths if d.dataset_impl == "pairwise" \
            else d.train_data_paths
        docs = sum(len(make_dataset(p)) for p in paths or [])
        return docs * cfg.model.seq_length + 1
    if d.train_data_paths:
        return sum(int(make_dataset(p).sizes.sum()) for p in d.train_data_paths)
    assert d.data_path is not None
    ds = make_dataset(d.data_path)
    bounds = get_train_valid_test_split_(d.split, len(ds))
    return int(ds.sizes[bounds[0]:bounds[1]].sum())


def sample_budget(cfg: NeoXConfig) -> SampleBudget:
    t = cfg.training
    global_batch = t.train_batch_size
    assert global_batch is not None and cfg.model.seq_length is not None
    if t.train_iters is not None:
        train_iters = t.train_iters
    else:
        assert t.train_epochs is not None
        per_epoch = max(0, (_tokens_in_train_split(cfg) - 1) // cfg.model.seq_length)
        train_iters = per_epoch * t.train_epochs // global_batch
        if train_iters < 1:
            raise ConfigError(f"train_epochs: {t.train_epochs} epochs of {per_epoch} samples "
                              f"make no full batch of {global_batch}")
    evals = train_iters // t.eval_interval + 1 if t.do_valid else 0
    return SampleBudget(
        train_iters=train_iters,
        train=train_iters * global_batch,
        valid=evals * t.eval_iters * global_batch,
        test=t.eval_iters * global_batch if t.do_test else 0,
    )


def build_datasets(cfg: NeoXConfig, budget: SampleBudget) -> tuple[Any, Any, Any]:
    assert cfg.model.seq_length is not None
    try:
        if unpacked_data(cfg):
            return build_post_training_datasets(
                cfg.data, cfg.posttrain, seq_length=cfg.model.seq_length,
                seed=cfg.training.seed,
                train_val_test_num_samples=[budget.train, budget.valid, budget.test])
        sets = build_train_valid_test_datasets(
            cfg.data, seq_length=cfg.model.seq_length, seed=cfg.training.seed,
            train_val_test_num_samples=[budget.train, budget.valid, budget.test],
            cache_dir=cfg.data.data_cache_dir,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from None
    if cfg.tokenizer.padded_vocab_size:
        for dataset in sets:
            check_token_ids(dataset, cfg.tokenizer.padded_vocab_size)
    return sets


def loader(dataset: Any, cfg: NeoXConfig, state: ParallelState, consumed: int) -> Any:
    if dataset is None:
        return None
    micro = cfg.training.train_micro_batch_size_per_gpu
    assert micro is not None
    if consumed >= len(dataset):
        consumed = consumed % len(dataset)
    return build_data_loader(dataset, consumed, micro, state.dp_rank, state.dp_size,
                             num_workers=cfg.data.num_workers)


def cycle_from(dataset: Any, cfg: NeoXConfig, state: ParallelState,
               consumed: int) -> Iterator[dict[str, torch.Tensor]] | None:
    """An endless iterator over micro batches: restarts from the first sample when the split
    is exhausted (evaluation sets that are smaller than all evaluations together)."""
    if dataset is None:
        return None

    def gen() -> Iterator[dict[str, torch.Tensor]]:
        start = consumed
        while True:
            yield from loader(dataset, cfg, state, start)
            start = 0

    return gen()


@dataclass(frozen=True)
class LMBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None  # None: plain causal attention
    position_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())


def lm_batch(raw: dict[str, torch.Tensor], cfg: NeoXConfig, eod: int,
             device: torch.device) -> LMBatch:
    d = cfg.data
    # The plain causal mask is never built: the model runs its causal kernel without one.
    tokens, labels, loss_mask, mask, positions = prepare_lm_batch(
        raw, eod, reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask, eod_mask_loss=d.eod_mask_loss,
        causal_attention_mask=False)
    return LMBatch(
        tokens=tokens.to(device, non_blocking=True),
        labels=labels.to(device, non_blocking=True),
        loss_mask=loss_mask.to(device, non_blocking=True),
        attention_mask=mask.to(device) if mask is not None else None,
        position_ids=positions.to(device, non_blocking=True),
    )


@dataclass(frozen=True)
class PreferenceBatch(LMBatch):
    """A post-training micro batch. With ``paired`` the first half of the rows are the
    chosen sequences and the second half the rejected ones, pair by pair; ``desirable`` (KTO)
    marks each row; ``ref_logps`` are precomputed reference log-probabilities per row."""

    paired: bool = False
    desirable: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def preference_batch(raw: dict[str, torch.Tensor], cfg: NeoXConfig, eod: int,
                     device: torch.device) -> PreferenceBatch:
    """The batch of an unpacked or pairwise loader batch: chosen and rejected rows stacked."""
    paired = "neg_text" in raw
    merged = dict(raw)
    if paired:
        merged["text"] = torch.cat([raw["text"], raw["neg_text"]])
        merged["label"] = torch.cat([raw["label"], raw["neg_label"]])
    base = lm_batch(merged, cfg, eod, device)
    desirable = raw["reward"].reshape(-1).to(device) > 0 if "reward" in raw else None
    ref = None
    if "ref_logp" in raw:
        ref = raw["ref_logp"].reshape(-1)
        if paired:
            ref = torch.cat([ref, raw["neg_ref_logp"].reshape(-1)])
        ref = ref.to(device=device, dtype=torch.float32)
    return PreferenceBatch(**{f: getattr(base, f) for f in LMBatch.__dataclass_fields__},
                           paired=paired, desirable=desirable, ref_logps=ref)


def make_batch(raw: dict[str, torch.Tensor], cfg: NeoXConfig, eod: int,
               device: torch.device) -> LMBatch:
    """The micro batch the configured training method consumes."""
    if unpacked_data(cfg):
        return preference_batch(raw, cfg, eod, device)
    return lm_batch(raw, cfg, eod, device)


def take(iterator: Iterator[Any], n: int) -> list[Any]:
    return list(itertools.islice(iterator, n))
