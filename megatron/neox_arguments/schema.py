"""The schema: every config key, the section it belongs to, its type, default and doc line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron.model.args import ModelArgs
from megatron.neox_arguments.fields import field_default, resolved_hints
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

# section attribute name -> (dataclass, title used in the generated reference)
SECTIONS: dict[str, tuple[type, str]] = {
    "parallelism": (ParallelismArgs, "Parallelism"),
    "model": (ModelArgs, "Model"),
    "act_ckpt": (ActivationCheckpointArgs, "Activation checkpointing"),
    "optim": (OptimizerArgs, "Optimizer"),
    "lr": (LRArgs, "Learning-rate schedule"),
    "training": (TrainingArgs, "Training loop and batch size"),
    "checkpoint": (CheckpointArgs, "Checkpoints"),
    "precision": (PrecisionArgs, "Mixed precision"),
    "data": (DataArgs, "Data"),
    "tokenizer": (TokenizerArgs, "Tokenizer"),
    "logging": (LoggingArgs, "Logging"),
    "textgen": (TextGenArgs, "Text generation and evaluation"),
    "ds": (DeepSpeedArgs, "DeepSpeed engine"),
    "launcher": (LauncherArgs, "DeepSpeed launcher"),
    "other": (OtherArgs, "Other"),
    "posttrain": (PostTrainArgs, "Post-training"),
}


@dataclass(frozen=True)
class KeySpec:
    name: str
    section: str
    type: Any
    default: Any
    doc: str
    origin: str
    derived: bool
    unsupported: str | None
    hint: str | None = None

    @property
    def status(self) -> str:
        """``refused`` (only the default is accepted), ``hint`` (accepted, no effect: a pure
        speed hint) or ``implemented``."""
        if self.unsupported:
            return "refused"
        return "hint" if self.hint else "implemented"


def _build_keys() -> dict[str, KeySpec]:
    keys: dict[str, KeySpec] = {}
    for section, (cls, _title) in SECTIONS.items():
        hints = resolved_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in keys:
                raise RuntimeError(f"config key {f.name} is declared in two sections")
            keys[f.name] = KeySpec(
                name=f.name,
                section=section,
                type=hints[f.name],
                default=field_default(f),
                doc=f.metadata["doc"],
                origin=f.metadata["origin"],
                derived=f.metadata["derived"],
                unsupported=f.metadata["unsupported"],
                hint=f.metadata["hint"],
            )
    return keys


# Immutable after import: a mapping from key name to its specification.
KEYS: dict[str, KeySpec] = _build_keys()

# Keys that also have another spelling in GPT-NeoX/Megatron configs.
# alias -> key; setting both to different values is an error.
ALIASES: dict[str, str] = {
    "distribute_checkpointed_activations": "partition_activations",
    "clip_grad": "gradient_clipping",
    "checkpoint_factor": "save_interval",
    "batch_size": "train_micro_batch_size_per_gpu",
}


def canonical_name(name: str) -> str:
    """``hidden-size`` and ``hidden_size`` are the same key."""
    return name.strip().replace("-", "_")


def user_keys() -> list[str]:
    return [k for k, spec in KEYS.items() if not spec.derived]
