"""megatron/logging/run_summary.py and tools/summarize_run.py: a run's metrics.jsonl (as the
MetricsLogger writes it) summarized as a loss curve, evaluations, throughput and checkpoint."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.logging.metrics import MetricsLogger, Throughput
from megatron.logging.run_summary import SummaryError, read_records, summarize

REPO_ROOT = Path(__file__).resolve().parents[2]
THROUGHPUT = Throughput(train_iters=30, tokens_per_iter=1000, flops_per_token=1e9,
                        model_flops_per_token=1e9, num_devices=1, peak_tflops=10.0)


def write_run(log_dir: Path, losses: list[float]) -> None:
    with MetricsLogger(rank=0, log_dir=log_dir, throughput=THROUGHPUT,
                       stream=io.StringIO()) as logger:
        for i, loss in enumerate(losses, start=1):
            logger.log_train(10 * i, lm_loss=loss, lr=1e-3, step_time_s=0.5 * i)
        logger.log_eval(10 * len(losses), 3.0)


def test_summary_of_a_logged_run(tmp_path: Path) -> None:
    write_run(tmp_path / "logs", [6.0, 5.0, 4.0])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("global_step30\n")
    summary = summarize(read_records(tmp_path / "logs"), tmp_path / "ckpt")
    lines = summary.lines
    assert lines[0] == "training loss"
    assert lines[1].split() == ["10", "6.000", "#" * 40]
    assert lines[3].split() == ["30", "4.000", "#"]
    assert lines[4] == "loss 6.000 (iteration 10) -> 4.000 (iteration 30)"
    assert lines[5] == "validation at iteration 30: loss 3.000, perplexity 20.1"
    # 1000 tokens in 0.5, 1.0, 1.5 s: 2000, 1000, 667 tokens/s, median 1000
    assert lines[6] == "throughput: 1000 tokens/s (median)"
    assert lines[7] == f"checkpoint: {tmp_path / 'ckpt' / 'global_step30'}"
    assert summary.loss_improved


def test_rising_or_missing_loss(tmp_path: Path) -> None:
    write_run(tmp_path / "up", [4.0, 5.0])
    assert not summarize(read_records(tmp_path / "up")).loss_improved
    with pytest.raises(SummaryError, match="metrics.jsonl not found"):
        read_records(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"type": "train"}\n{oops\n')
    with pytest.raises(SummaryError, match=r"metrics.jsonl:2: not a JSON record"):
        read_records(tmp_path / "bad")
    with pytest.raises(SummaryError, match="no training records"):
        summarize([{"type": "eval", "split": "validation", "iteration": 1}])


def test_command_line(tmp_path: Path) -> None:
    write_run(tmp_path / "logs", [6.0, 5.0])
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    script = REPO_ROOT / "tools" / "summarize_run.py"
    ok = subprocess.run([sys.executable, script, tmp_path / "logs"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "loss 6.000 (iteration 10) -> 5.000 (iteration 20)" in ok.stdout
    missing = subprocess.run([sys.executable, script, tmp_path / "none"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert missing.returncode == 1
    expected = f"summarize_run.py: {tmp_path / 'none' / 'metrics.jsonl'} not found"
    assert missing.stderr.strip() == expected
