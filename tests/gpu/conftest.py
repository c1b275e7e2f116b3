"""The GPU suite is collected only when its runner asks for it (``make test-gpu``, which sets
``GPU_SUITE=1`` after finding a CUDA device): ``make test`` and a plain ``pytest tests`` on a
CPU machine do not collect these files at all."""

import os

collect_ignore_glob = [] if os.environ.get("GPU_SUITE") == "1" else ["test_*.py"]
