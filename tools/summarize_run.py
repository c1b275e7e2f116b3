#!/usr/bin/env python
"""Summarize a training run from its metrics.jsonl: the loss curve, evaluations, checkpoint.

    python tools/summarize_run.py runs/demo/logs [--save runs/demo/checkpoints]

Exit status 0 when the loss went down, 1 otherwise (see :mod:`megatron.logging.run_summary`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.logging.run_summary import SummaryError, read_records, summarize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--save", type=Path, help="checkpoint directory of the run")
    args = parser.parse_args()
    try:
        summary = summarize(read_records(args.log_dir), args.save)
    except SummaryError as exc:
        sys.exit(f"summarize_run.py: {exc}")
    print("\n".join(summary.lines))
    return 0 if summary.loss_improved else 1


if __name__ == "__main__":
    sys.exit(main())
