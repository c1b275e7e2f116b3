#!/usr/bin/env python
"""Generate text from a checkpoint. Launch through deepy.py:

    python deepy.py generate.py configs/125M.yml configs/local_setup.yml \
        configs/text_generation.yml

``load`` names the checkpoint; ``text_gen_type`` picks unconditional, input-file or interactive
generation (see docs/generation.md). For one process without the launcher:
``python generate.py configs/x.yml configs/text_generation.yml``.
"""

from megatron.runtime import run_main
from megatron.text_generation.runner import main

if __name__ == "__main__":
    run_main(main)
