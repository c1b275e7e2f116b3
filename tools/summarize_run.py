#!/usr/bin/env python
"""Summarize a training run from its metrics.jsonl: the loss curve, evaluations, checkpoint.

    python tools/summarize_run.py runs/demo/logs [--save runs/demo/checkpoints]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(log_dir: Path) -> list[dict]:
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"summarize_run.py: {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--save", type=Path, help="checkpoint directory of the run")
    args = parser.parse_args()
    rows = load(args.log_dir)
    train = [r for r in rows if r.get("type") == "train" and r.get("lm_loss") is not None]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train:
        sys.exit("summarize_run.py: no training records")
    width = 40
    losses = [r["lm_loss"] for r in train]
    low, high = min(losses), max(losses)
    print("training loss")
    for r in train:
        bar = int(round(width * (r["lm_loss"] - low) / max(high - low, 1e-9)))
        print(f"  {r['iteration']:>6}  {r['lm_loss']:7.3f}  {'#' * max(bar, 1)}")
    first, last = train[0], train[-1]
    print(f"loss {first['lm_loss']:.3f} (iteration {first['iteration']}) -> "
          f"{last['lm_loss']:.3f} (iteration {last['iteration']})")
    for r in evals:
        print(f"{r['split']} at iteration {r['iteration']}: loss {r['eval_loss']:.3f}, "
              f"perplexity {r['eval_ppl']:.1f}")
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    if speeds:
        print(f"throughput: {sorted(speeds)[len(speeds) // 2]:.0f} tokens/s (median)")
    if args.save is not None and (args.save / "latest").is_file():
        print(f"checkpoint: {args.save / (args.save / 'latest').read_text().strip()}")
    return 0 if math.isfinite(last["lm_loss"]) and last["lm_loss"] < first["lm_loss"] else 1


if __name__ == "__main__":
    sys.exit(main())
