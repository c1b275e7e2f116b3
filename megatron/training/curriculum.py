"""Sequence-length curriculum (``curriculum_learning`` with ``curriculum_type: seqlen``), as in
GPT-NeoX: DeepSpeed's ``CurriculumScheduler`` gives the length for each step (it grows from
``min_difficulty`` to ``max_difficulty`` by the block's schedule) and every training micro batch
is cut to its first ``curriculum_seqlen`` positions (tokens, labels, loss mask, positions and
any attention mask). Evaluation uses full-length batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.training.data_setup import LMBatch


def curriculum_active(block: dict[str, Any] | None) -> bool:
    return bool(block) and block.get("enabled", True) is not False


def scheduler(block: dict[str, Any]) -> Any:
    """DeepSpeed's scheduler for ``block``; ValueError with a one-line reason if malformed."""
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    kind = block.get("curriculum_type", "seqlen")
    if kind != "seqlen":
        raise ValueError(f"curriculum_type {kind!r} is not supported (only 'seqlen')")
    config = {k: v for k, v in block.items() if k not in ("enabled", "curriculum_type")}
    try:
        return CurriculumScheduler(config)
    except (AssertionError, KeyError, TypeError) as exc:
        raise ValueError(str(exc) or f"malformed block {config!r}") from None


class SeqlenCurriculum:
    def __init__(self, block: dict[str, Any]):
        self._scheduler = scheduler(block)

    def seqlen(self, iteration: int) -> int:
        """The length of step ``iteration`` (1-based: the step about to run)."""
        return int(self._scheduler.update_difficulty(iteration))


def truncate(batch: LMBatch, seqlen: int) -> LMBatch:
    """``batch`` cut to its first ``seqlen`` positions (unchanged when not longer)."""
    if seqlen >= batch.tokens.shape[1]:
        return batch
    changes: dict[str, Any] = {
        "tokens": batch.tokens[:, :seqlen].contiguous(),
        "labels": batch.labels[:, :seqlen].contiguous(),
        "loss_mask": batch.loss_mask[:, :seqlen].contiguous(),
        "position_ids": batch.position_ids[:, :seqlen].contiguous(),
    }
    if batch.attention_mask is not None:
        changes["attention_mask"] = batch.attention_mask[..., :seqlen, :seqlen].contiguous()
    return dataclasses.replace(batch, **changes)
