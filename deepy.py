#!/usr/bin/env python
"""Launch a training, generation or evaluation script from GPT-NeoX config files.

    python deepy.py train.py configs/125M.yml configs/local_setup.yml

``python deepy.py --help`` lists the options; the launcher lives in ``megatron/launch/``.
"""

import sys

from megatron.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
