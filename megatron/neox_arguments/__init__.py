"""The configuration system: GPT-NeoX YAML keys -> merged -> validated, resolved config.

Typical use::

    merged = load_config_files(["configs/125M.yml", "configs/local_setup.yml"])
    cfg = resolve_config(merged, RunFacts(world_size=8, gpu=True))
    cfg.model.hidden_size, cfg.training.train_micro_batch_size_per_gpu
    ds_dict = build_deepspeed_config(cfg)

The names below load on first use: the model's config section
(:class:`megatron.model.args.ModelArgs`) declares its keys with
:func:`megatron.neox_arguments.fields.key`, so importing the field helpers must not pull in the
schema that imports the model's section.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig, padded_vocab_size
    from megatron.neox_arguments.deepspeed_config import build_deepspeed_config
    from megatron.neox_arguments.fields import ConfigError
    from megatron.neox_arguments.loader import (
        MergedConfig,
        Override,
        load_config_files,
        merge_configs,
    )
    from megatron.neox_arguments.resolve import RunFacts, purpose_of, resolve_config
    from megatron.neox_arguments.schema import KEYS, SECTIONS

_HOMES = {
    "NeoXConfig": "config", "padded_vocab_size": "config",
    "build_deepspeed_config": "deepspeed_config", "ConfigError": "fields",
    "MergedConfig": "loader", "Override": "loader", "load_config_files": "loader",
    "merge_configs": "loader", "RunFacts": "resolve", "purpose_of": "resolve",
    "resolve_config": "resolve", "KEYS": "schema", "SECTIONS": "schema",
}  # fmt: skip

__all__ = [
    "KEYS", "SECTIONS", "ConfigError", "MergedConfig", "NeoXConfig", "Override", "RunFacts",
    "build_deepspeed_config", "load_config_files", "merge_configs", "padded_vocab_size",
    "purpose_of", "resolve_config",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
