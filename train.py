#!/usr/bin/env python
"""Train a GPT model. Launch through deepy.py:

    python deepy.py train.py configs/125M.yml configs/local_setup.yml

or, for one process without the launcher, ``python train.py configs/tiny_neox.yml ...``.
"""

from megatron.runtime import run_main
from megatron.training.loop import train

if __name__ == "__main__":
    run_main(train)
