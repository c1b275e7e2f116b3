#!/usr/bin/env python
"""Export the LoRA adapters of a training checkpoint.

    python tools/ckpts/export_lora.py --input_dir checkpoints/lora \\
        --config_file configs/tiny_neox.yml lora.yml --merged_dir merged --peft_dir adapter

``--merged_dir``: a plain checkpoint with the adapters folded into the weights (load it with
``finetune``, generate from it, or convert it with convert_neox_to_hf.py). ``--peft_dir``: a
Hugging Face PEFT adapter for the base model converted with ``--architecture neox``. The logic
is :mod:`megatron.training.lora`; see docs/post_training.md.
"""

import sys

from megatron.training.lora import export_main

if __name__ == "__main__":
    sys.exit(export_main())
