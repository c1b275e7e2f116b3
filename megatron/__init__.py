"""A Megatron-style GPT pretraining framework driven by GPT-NeoX configuration files."""

import os

if not os.environ.get("DS_ACCELERATOR"):
    # pick cuda or cpu before anything imports DeepSpeed (this imports torch); where the
    # launcher already chose, importing the package stays light (the rank guard needs no torch)
    from megatron.accelerator import ensure_accelerator_env

    ensure_accelerator_env()

__version__ = "0.1.0"
