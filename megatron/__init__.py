"""A Megatron-style GPT pretraining framework driven by GPT-NeoX configuration files."""

from megatron.accelerator import ensure_accelerator_env

ensure_accelerator_env()

__version__ = "0.1.0"
