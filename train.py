#!/usr/bin/env python
"""Train a GPT model. Launch through deepy.py:

    python deepy.py train.py configs/125M.yml configs/local_setup.yml

or, for one process without the launcher, ``python train.py configs/tiny_neox.yml ...``.
"""

from megatron.training.stop_signal import StopSignal

if __name__ == "__main__":
    stop = StopSignal()  # from here on SIGTERM/SIGINT stop the run at a step boundary
    from megatron.runtime import run_main
    from megatron.training.loop import train

    run_main(lambda: train(stop=stop))
