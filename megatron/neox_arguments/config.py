"""The resolved configuration: one frozen object with a frozen section per key group."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron.model.args import ModelArgs
from megatron.neox_arguments.groups_deepspeed import DeepSpeedArgs, LauncherArgs
from megatron.neox_arguments.groups_io import (
    DataArgs,
    LoggingArgs,
    OtherArgs,
    TextGenArgs,
    TokenizerArgs,
)
from megatron.neox_arguments.groups_model import ActivationCheckpointArgs, ParallelismArgs
from megatron.neox_arguments.groups_posttrain import PostTrainArgs
from megatron.neox_arguments.groups_training import (
    CheckpointArgs,
    LRArgs,
    OptimizerArgs,
    PrecisionArgs,
    TrainingArgs,
)
from megatron.neox_arguments.loader import MergedConfig
from megatron.neox_arguments.schema import KEYS, SECTIONS


@dataclass(frozen=True)
class NeoXConfig:
    """A validated configuration with every derived value filled in.

    Components receive the sections they need (``cfg.model``, ``cfg.parallelism``, ...);
    nothing modifies a config after :func:`~megatron.neox_arguments.resolve.resolve_config`
    has built it. ``with_vocab_size`` returns a new object once the tokenizer is known.
    """

    parallelism: ParallelismArgs
    model: ModelArgs
    act_ckpt: ActivationCheckpointArgs
    optim: OptimizerArgs
    lr: LRArgs
    training: TrainingArgs
    checkpoint: CheckpointArgs
    precision: PrecisionArgs
    data: DataArgs
    tokenizer: TokenizerArgs
    logging: LoggingArgs
    textgen: TextGenArgs
    ds: DeepSpeedArgs
    launcher: LauncherArgs
    other: OtherArgs
    posttrain: PostTrainArgs
    merged: MergedConfig = field(repr=False, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def get(self, name: str) -> Any:
        """Flat lookup by key name, as GPT-NeoX users know the keys."""
        spec = KEYS.get(name.replace("-", "_"))
        if spec is None:
            raise KeyError(name)
        return getattr(getattr(self, spec.section), spec.name)

    def flat(self) -> dict[str, Any]:
        """Every key and its resolved value."""
        return {name: self.get(name) for name in KEYS}

    def replace_section(self, section: str, **changes: Any) -> NeoXConfig:
        """A new config with some values of one section changed (used by derivation steps)."""
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)}
        )

    def with_vocab_size(self, vocab_size: int) -> NeoXConfig:
        """A new config whose ``padded_vocab_size`` fits a tokenizer of ``vocab_size`` tokens."""
        return self.replace_section(
            "tokenizer", padded_vocab_size=padded_vocab_size(
                vocab_size, self.model.make_vocab_size_divisible_by,
                self.parallelism.model_parallel_size,
            )
        )

    @property
    def params_dtype_name(self) -> str:
        """The ``torch`` dtype name of the parameters (``getattr(torch, name)``): the one
        precision-to-dtype table."""
        return {"fp16": "float16", "bfloat16": "bfloat16"}.get(self.precision.precision or "",
                                                              "float32")

    def user_values(self) -> dict[str, Any]:
        """The keys the user's files set, as merged."""
        return dict(self.merged.values)

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SECTIONS}


def padded_vocab_size(vocab_size: int, divisible_by: int, model_parallel_size: int) -> int:
    """Round the vocabulary up so every tensor-parallel shard gets a multiple of ``divisible_by``."""
    multiple = max(1, divisible_by) * max(1, model_parallel_size)
    return ((vocab_size + multiple - 1) // multiple) * multiple
