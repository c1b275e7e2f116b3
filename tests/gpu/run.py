#!/usr/bin/env python
"""``make test-gpu``: the GPU suite (``tests/gpu``), on a machine with a CUDA device.

On a machine without one it says so and exits 0 without running anything. Works with any
python that has torch and pytest (the project's .venv or a GPU machine's own python3 with
the packages of ``tools/gpu_env.sh``). Extra arguments go to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NEEDS_GPU = "make test-gpu needs a CUDA GPU (none is visible here): " \
            "nothing was run"


def cuda_present() -> bool:
    from megatron.accelerator import gpu_present

    return gpu_present()


def main(argv: list[str]) -> int:
    if not cuda_present():
        print(NEEDS_GPU, flush=True)
        return 0
    env = {**os.environ, "GPU_SUITE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "--durations=15", "-p",
           "no:cacheprovider", "tests/gpu", *argv]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
