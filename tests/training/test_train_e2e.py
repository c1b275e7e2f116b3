"""The trainer end to end through deepy.py on CPU ranks: learning, logs, skips, resume."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
from e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    records,
    run_deepy,
    write_config,
)

pytestmark = pytest.mark.slow

REQUIRED_FIELDS = {"iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s",
                   "tflops", "mfu", "skipped_iters"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"))


def test_loss_falls_logs_are_written_and_a_nan_step_is_skipped(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yml", base_values(
        corpus, run, num_gpus=2, train_iters=40, eval_interval=20, eval_iters=2,
        optimizer={"type": "AdamW", "params": {"lr": 0.003, "betas": [0.9, 0.95]}},
        warmup=0.05, tensorboard_dir=str(run / "tb"), use_wandb=True,
        wandb_project="e2e", inject_nonfinite_loss_iters=[10], wall_clock_breakdown=True,
        scaled_upper_triang_masked_softmax_fusion=True,
        use_comet=True, comet_project="e2e", comet_tags=["cpu"],
    ))
    proc = run_deepy("configs/tiny_neox.yml", cfg,
                     env={"WANDB_MODE": "offline", "COMET_START_ONLINE": "false"})
    assert proc.returncode == 0, explain(proc)
    train = records(run)
    assert [r["iteration"] for r in train] == list(range(1, 41))
    for r in train:
        assert REQUIRED_FIELDS <= set(r)
    by_iter = {r["iteration"]: r for r in train}
    # the injected NaN step is skipped on every rank, counted, and training goes on
    assert [r["skipped_iters"] for r in train] == [0] * 9 + [1] * 31
    assert by_iter[10]["lm_loss"] is None  # no applied step in that interval
    finite = [by_iter[i]["lm_loss"] for i in range(1, 41) if i != 10]
    assert all(math.isfinite(x) for x in finite)
    first, last = sum(finite[:5]) / 5, sum(finite[-5:]) / 5
    assert first > math.log(64) and last < first - 1.0, (first, last)
    assert by_iter[40]["tokens_per_sec"] > 0 and by_iter[40]["step_time_s"] > 0
    evals = records(run, "eval")
    assert [e["iteration"] for e in evals] == [20, 40]
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-6)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
    assert "iteration 40/40" in proc.stdout
    # a speed hint is noted once, in rank 0's log
    note = "note: scaled_upper_triang_masked_softmax_fusion is a speed hint with no effect here"
    run_log = (run / "logs" / "run.log").read_text()
    assert run_log.count(note) == 1 and proc.stdout.count(note) == 1
    breakdown = [ln for ln in proc.stdout.splitlines() if ln.startswith("time (ms) | forward: ")]
    assert len(breakdown) == 40 and "| optimizer: " in breakdown[-1] and "| data: " in breakdown[-1]
    # TensorBoard got the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/lm_loss")]
    assert 40 in steps and len(steps) == 39  # the skipped interval logged no loss
    assert [e.step for e in acc.Scalars("eval/loss")] == [20, 40]
    # an offline W&B run directory with its data file
    runs = list((run / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in runs[0].iterdir())
    # an offline Comet archive with the same losses (use_comet)
    (archive,) = (run / "logs" / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines() if line]
    comet = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]):
             m["payload"]["metric"]["metricValue"] for m in messages if m["type"] == "metric_msg"}
    assert comet[("train/lm_loss", 40)] == pytest.approx(by_iter[40]["lm_loss"], rel=1e-6)
    assert ("train/lm_loss", 10) not in comet and ("eval/loss", 20) in comet


def test_consecutive_non_finite_steps_stop_the_run(corpus, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yml", base_values(
        corpus, run, train_iters=10, inject_nonfinite_loss_iters=[3, 4, 5],
        max_consecutive_skipped_iters=3,
        optimizer={"type": "AdamW", "params": {"lr": 0.001}},
    ))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode != 0
    assert "3 optimizer steps in a row were skipped for a non-finite loss or gradient" in \
        proc.stderr
    assert "Traceback" not in proc.stderr.split("3 optimizer steps")[0][-300:]
    assert max(r["iteration"] for r in records(run)) == 4
