"""The configuration system: GPT-NeoX YAML keys -> merged -> validated, resolved config.

Typical use::

    merged = load_config_files(["configs/125M.yml", "configs/local_setup.yml"])
    cfg = resolve_config(merged, RunFacts(world_size=8, gpu=True))
    cfg.model.hidden_size, cfg.training.train_micro_batch_size_per_gpu
    ds_dict = build_deepspeed_config(cfg)
"""

from megatron.neox_arguments.config import NeoXConfig, padded_vocab_size
from megatron.neox_arguments.deepspeed_config import build_deepspeed_config
from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.loader import MergedConfig, Override, load_config_files, merge_configs
from megatron.neox_arguments.resolve import RunFacts, purpose_of, resolve_config
from megatron.neox_arguments.schema import KEYS, SECTIONS

__all__ = [
    "KEYS", "SECTIONS", "ConfigError", "MergedConfig", "NeoXConfig", "Override", "RunFacts",
    "build_deepspeed_config", "load_config_files", "merge_configs", "padded_vocab_size",
    "purpose_of", "resolve_config",
]
