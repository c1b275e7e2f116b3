"""A run summarized from its ``metrics.jsonl``: the loss curve, evaluations, throughput and the
latest checkpoint (command line: ``tools/summarize_run.py``).

:func:`read_records` reads ``<log_dir>/metrics.jsonl`` as :class:`~megatron.logging.metrics.
MetricsLogger` writes it; :func:`summarize` turns the records into printable lines and says
whether the loss went down (the last training loss finite and below the first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BAR_WIDTH = 40


class SummaryError(ValueError):
    """Logs that cannot be summarized, reported as one line."""


@dataclass(frozen=True)
class RunSummary:
    lines: list[str]
    loss_improved: bool


def read_records(log_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``<log_dir>/metrics.jsonl`` in file order."""
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        raise SummaryError(f"{path} not found")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise SummaryError(f"{path}:{number}: not a JSON record ({exc})") from None
    return records


def summarize(records: Sequence[dict[str, Any]], save_dir: Path | None = None) -> RunSummary:
    """The loss curve as a bar chart, first -> last loss, evaluation results, the median
    throughput and, with ``save_dir``, the checkpoint its ``latest`` names."""
    train = [r for r in records if r.get("type") == "train" and r.get("lm_loss") is not None]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        raise SummaryError("no training records")
    losses = [r["lm_loss"] for r in train]
    low, high = min(losses), max(losses)
    lines = ["training loss"]
    for r in train:
        bar = int(round(BAR_WIDTH * (r["lm_loss"] - low) / max(high - low, 1e-9)))
        lines.append(f"  {r['iteration']:>6}  {r['lm_loss']:7.3f}  {'#' * max(bar, 1)}")
    first, last = train[0], train[-1]
    lines.append(f"loss {first['lm_loss']:.3f} (iteration {first['iteration']}) -> "
                 f"{last['lm_loss']:.3f} (iteration {last['iteration']})")
    for r in evals:
        lines.append(f"{r['split']} at iteration {r['iteration']}: loss {r['eval_loss']:.3f}, "
                     f"perplexity {r['eval_ppl']:.1f}")
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    if speeds:
        lines.append(f"throughput: {sorted(speeds)[len(speeds) // 2]:.0f} tokens/s (median)")
    if save_dir is not None and (save_dir / "latest").is_file():
        lines.append(f"checkpoint: {save_dir / (save_dir / 'latest').read_text().strip()}")
    improved = math.isfinite(last["lm_loss"]) and last["lm_loss"] < first["lm_loss"]
    return RunSummary(lines, improved)
