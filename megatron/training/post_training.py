"""The loss of one micro batch for every ``train_impl``, and what each method needs besides
the model: the frozen reference model (DPO, KTO) and the scalar reward head (RM).

``Objective.loss(forward, batch)`` runs the model through ``forward`` (DeepSpeed's engine,
so that backward and gradient reduction stay DeepSpeed's) and returns the loss and the values
to log. The loss formulas are in :mod:`megatron.training.preference`.

- ``normal``: the LM loss on the trained tokens (SFT: labels -100 elsewhere), plus
  ``z_loss`` times the z-loss when set.
- ``dpo``: summed log-probabilities of the chosen and rejected completions (the tokens with
  labels), against the reference model's (or the precomputed ones, or none with
  ``dpo_reference_free``).
- ``kto``: the same on unpaired rows marked desirable or not; the reference point is the
  micro batch's mean log-ratio (detached, at least 0).
- ``orpo``: per-token mean log-probabilities and the LM loss on the chosen rows.
- ``rm``: the reward head on the final hidden state at each sequence's last trained
  position (the one predicting its last labelled token, as GPT-NeoX); ``rm_pooling: mean``
  (an addition) averages the head over the trained positions instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron.model import lm_loss
from megatron.neox_arguments import NeoXConfig
from megatron.parallel.layers import set_tensor_parallel_attributes
from megatron.parallel.state import ParallelState
from megatron.training import preference as P
from megatron.training.data_setup import LMBatch, PreferenceBatch

Forward = Callable[..., torch.Tensor]

_REWARDS = ("rewards_chosen", "rewards_rejected", "rewards_margin")
# what each method logs (every rank reduces the same list, present or not on it)
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "normal": (),
    "dpo": (*_REWARDS, "rewards_accuracy", "logps_chosen", "logps_rejected", "kl_chosen"),
    "kto": (*_REWARDS, "logps_chosen", "logps_rejected", "kl"),
    "orpo": (*_REWARDS, "rewards_accuracy", "nll_loss", "log_odds_ratio", "log_odds_chosen"),
    "rm": (*_REWARDS, "rewards_accuracy"),
}


class RewardHead(nn.Module):
    """hidden ``[.., h]`` -> one scalar; replicated on every tensor-parallel rank."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / hidden_size ** 0.5)
        nn.init.zeros_(self.proj.bias)
        for p in self.proj.parameters():
            set_tensor_parallel_attributes(p, False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float() if hidden.dtype != self.proj.weight.dtype
                         else hidden).squeeze(-1)


def needs_reference(cfg: NeoXConfig) -> bool:
    """Whether the method runs a frozen copy of the starting model."""
    pt = cfg.posttrain
    if pt.train_impl == "dpo":
        return not pt.dpo_reference_free and not pt.precompute_model_name
    return pt.train_impl == "kto" and not pt.precompute_model_name


def attach_reward_head(model: nn.Module, cfg: NeoXConfig) -> None:
    """RM: the scalar head, a submodule of the model (trained and saved with it)."""
    assert cfg.model.hidden_size is not None
    model.reward_head = RewardHead(cfg.model.hidden_size)  # type: ignore[assignment]


def frozen(ref: nn.Module) -> nn.Module:
    """``ref`` in eval mode without gradients (the reference model)."""
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def last_trained_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the last position with a trained prediction: the position whose output
    predicts the sequence's last labelled token (its end of document), i.e. the one that has
    read every token before it. GPT-NeoX reads the reward there (its reward-model data labels
    only the end-of-document token); 0 for a row with nothing trained."""
    positions = torch.arange(loss_mask.shape[-1], device=loss_mask.device).expand_as(loss_mask)
    return torch.where(loss_mask > 0, positions, torch.zeros_like(positions)).amax(-1)


@dataclass
class Objective:
    cfg: NeoXConfig
    state: ParallelState
    reference: nn.Module | None = None

    @property
    def impl(self) -> str:
        return self.cfg.posttrain.train_impl

    def metric_names(self) -> tuple[str, ...]:
        extra = ("z_loss",) if self.cfg.posttrain.z_loss > 0 else ()
        return METRIC_NAMES[self.impl] + extra

    def _inputs(self, batch: LMBatch) -> dict[str, Any]:
        return {"position_ids": batch.position_ids, "attention_mask": batch.attention_mask}

    def _logps(self, logits: torch.Tensor, batch: LMBatch, fp32: bool,
               average: bool = False) -> torch.Tensor:
        return P.sequence_logps(logits, batch.labels, batch.loss_mask, self.state, fp32=fp32,
                                average=average)

    def _reference_logps(self, batch: LMBatch, fp32: bool) -> torch.Tensor:
        if isinstance(batch, PreferenceBatch) and batch.ref_logps is not None:
            return batch.ref_logps
        if self.reference is None:
            raise RuntimeError(f"{self.impl}: no reference model and no precomputed "
                               "reference log-probabilities")
        with torch.no_grad():
            logits = self.reference(batch.tokens, **self._inputs(batch))
            return self._logps(logits, batch, fp32)

    def loss(self, forward: Forward, batch: LMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        impl, pt = self.impl, self.cfg.posttrain
        fp32_lm = not self.cfg.model.fp16_lm_cross_entropy
        if impl == "rm":
            return self._rm(forward, batch)
        logits = forward(batch.tokens, **self._inputs(batch))
        metrics: dict[str, Any] = {}
        if impl == "normal":
            loss = lm_loss(logits, batch.labels, batch.loss_mask, self.state, fp32=fp32_lm)
        elif impl == "dpo":
            logps = self._logps(logits, batch, pt.dpo_fp32)
            ref = None if pt.dpo_reference_free else self._reference_logps(batch, pt.dpo_fp32)
            half = logps.shape[0] // 2
            loss, metrics = P.dpo_loss(logps[:half], logps[half:],
                                       None if ref is None else ref[:half],
                                       None if ref is None else ref[half:], beta=pt.dpo_beta)
        elif impl == "kto":
            assert isinstance(batch, PreferenceBatch) and batch.desirable is not None
            logps = self._logps(logits, batch, pt.kto_fp32)
            ref = self._reference_logps(batch, pt.kto_fp32)
            loss, metrics = P.kto_loss(
                logps, ref, batch.desirable, P.kto_kl(logps.detach(), ref), beta=pt.kto_beta,
                desirable_weight=pt.kto_desirable_weight,
                undesirable_weight=pt.kto_undesirable_weight)
        elif impl == "orpo":
            means = self._logps(logits, batch, True, average=True)
            half = means.shape[0] // 2
            nll = lm_loss(logits[:half], batch.labels[:half], batch.loss_mask[:half],
                          self.state, fp32=fp32_lm)
            loss, metrics = P.orpo_loss(means[:half], means[half:], nll, lam=pt.orpo_lambda)
        else:
            raise ValueError(f"train_impl {impl!r} is not implemented")
        if pt.z_loss > 0:
            z = P.z_loss(logits, batch.loss_mask, self.state)
            metrics["z_loss"] = z.detach()
            loss = loss + pt.z_loss * z
        return loss, metrics

    def _rm(self, forward: Forward, batch: LMBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden = forward(batch.tokens, hidden_only=True, **self._inputs(batch))
        module = getattr(forward, "module", forward)
        head = module.reward_head
        if self.cfg.posttrain.rm_pooling == "mean":
            # the mean value over the positions that predict the trained tokens
            mask = batch.loss_mask.to(torch.float32)
            rewards = (head(hidden) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        else:
            index = last_trained_index(batch.loss_mask)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            rewards = head(hidden[rows, index])
        half = rewards.shape[0] // 2
        loss, metrics = P.rm_loss(rewards[:half], rewards[half:])
        if self.cfg.posttrain.z_loss > 0:  # GPT-NeoX's reward z-loss
            z = (rewards[:half].float().square() + rewards[half:].float().square()).mean()
            metrics["z_loss"] = z.detach()
            loss = loss + self.cfg.posttrain.z_loss * z
        return loss, metrics


def reference_logps_prefixes(cfg: NeoXConfig) -> list[tuple[str, str | None]]:
    """Every (data, labels) prefix of the configured post-training data whose reference
    log-probabilities ``precompute_model_name`` reads."""
    pt, d = cfg.posttrain, cfg.data
    out: list[tuple[str, str | None]] = []
    for split in ("train", "valid", "test"):
        if d.dataset_impl == "pairwise":
            for side in ("pos", "neg"):
                paths = getattr(pt, f"{side}_{split}_data_paths") or []
                labels = getattr(pt, f"{side}_{split}_label_data_paths") or [None] * len(paths)
                out += list(zip(paths, labels))
        else:
            paths = getattr(d, f"{split}_data_paths") or []
            labels = getattr(d, f"{split}_label_data_paths") or [None] * len(paths)
            out += list(zip(paths, labels))
    return list(dict.fromkeys(out))  # valid and test often repeat a dataset


@torch.no_grad()
def precompute_reference_logps(model: nn.Module, cfg: NeoXConfig, state: ParallelState,
                               eod: int, device: torch.device, *, write: bool,
                               batch_size: int = 8, log: Callable[[str], None] = print
                               ) -> list[str]:
    """``text_gen_type: precompute``: the summed log-probability of every document's labelled
    tokens under ``model`` (cut to a sample as training cuts it), written as float32 datasets
    ``<data path>_<precompute_model_name>_ref`` (by the rank with ``write``). Every rank of a
    tensor-parallel group must call it. Returns the written prefixes."""
    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, make_dataset
    from megatron.data.pairwise_dataset import IGNORE
    from megatron.training.data_setup import lm_batch

    name = cfg.posttrain.precompute_model_name
    if not name:
        raise ValueError("precompute_model_name: not set (names the reference datasets)")
    assert cfg.model.seq_length is not None
    width = cfg.model.seq_length + 1
    fp32 = cfg.posttrain.dpo_fp32 if cfg.posttrain.train_impl == "dpo" else \
        cfg.posttrain.kto_fp32
    written = []
    for data_prefix, label_prefix in reference_logps_prefixes(cfg):
        text = make_dataset(data_prefix)
        labels = make_dataset(label_prefix) if label_prefix else text
        values: list[float] = []
        for start in range(0, len(text), batch_size):
            docs = range(start, min(start + batch_size, len(text)))
            raw = {"text": torch.zeros(len(docs), width, dtype=torch.long),
                   "label": torch.full((len(docs), width), IGNORE, dtype=torch.long)}
            for row, doc in enumerate(docs):
                t = torch.from_numpy(np.asarray(text[doc][:width], dtype=np.int64))
                lab = torch.from_numpy(np.asarray(labels[doc][:width], dtype=np.int64))
                raw["text"][row, :len(t)] = t
                raw["label"][row, :len(lab)] = lab
            batch = lm_batch(raw, cfg, eod, device)
            logits = model(batch.tokens, position_ids=batch.position_ids,
                           attention_mask=batch.attention_mask)
            values += P.sequence_logps(logits, batch.labels, batch.loss_mask, state,
                                       fp32=fp32).tolist()
        out = f"{data_prefix}_{name}_ref"
        if write:
            builder = MMapIndexedDatasetBuilder(out + ".bin", np.float32)
            for v in values:
                builder.add_document(np.asarray([v], dtype=np.float32))
            builder.finalize(out + ".idx")
            log(f"reference log-probabilities of {len(values)} documents: {out}")
        written.append(out)
    return written
