#!/usr/bin/env python
"""Evaluate a checkpoint with the lm-evaluation-harness. Launch through deepy.py:

    python deepy.py eval.py configs/125M.yml configs/local_setup.yml \
        --eval_tasks lambada_openai hellaswag

``load`` names the checkpoint; results go to ``<eval_results_prefix>_results.json`` and the
table is printed on rank 0 (see docs/generation.md).
"""

from megatron.evaluation.runner import main
from megatron.runtime import run_main

if __name__ == "__main__":
    run_main(main)
