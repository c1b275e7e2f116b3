"""Resuming through deepy.py at another parallel layout than the one that saved.

Every layout sees the same global batch (8 samples per step) from the same seed. One reference
run per layout trains STEPS steps and saves at SAVE_AT; each case copies that checkpoint, resumes
it at another layout for the remaining steps and compares those losses with the reference run
that continued at the original layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    losses,
    records,
    run_deepy,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 4, 2
MODEL = {"no_weight_tying": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "train_iters": STEPS, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
         "gradient_accumulation_steps": None, "num_layers": 2, "hidden_size": 32,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.003}}, "warmup": 0.0,
         "gradient_clipping": 1.0}
LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2": {"num_gpus": 2, "model_parallel_size": 2},
    "dp2": {"num_gpus": 2},  # tensor parallel 1, ZeRO 0
    "pp2": {"num_gpus": 2, "pipe_parallel_size": 2},
    "pp1": {"num_gpus": 2, "pipe_parallel_size": 1},
    "dp2_zero1": {"num_gpus": 2, "zero_optimization": {"stage": 1}},
    "dp1_zero1": {"num_gpus": 1, "zero_optimization": {"stage": 1}},
    "zero3": {"num_gpus": 2, "zero_optimization": {"stage": 3}},
}
CASES = [("tp2", "dp2"), ("dp2", "tp2"), ("pp2", "pp1"), ("pp1", "pp2"),
         ("dp2_zero1", "dp1_zero1"), ("dp1_zero1", "dp2_zero1"), ("zero3", "dp2"),
         ("dp2", "zero3")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"), max_docs=120)


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory):
    """The reference run of a layout, trained once per module: ``(run dir, losses)``."""
    done: dict[str, tuple[Path, dict[int, float]]] = {}
    tmp = tmp_path_factory.mktemp("references")

    def get(name: str) -> tuple[Path, dict[int, float]]:
        if name not in done:
            run = tmp / name
            cfg = write_config(tmp / f"{name}.yml", base_values(
                corpus, run, save=str(run / "ckpt"), save_interval=SAVE_AT,
                **{**MODEL, **LAYOUTS[name]}))
            proc = run_deepy("configs/tiny_neox.yml", cfg)
            assert proc.returncode == 0, explain(proc)
            got = losses(run)
            assert sorted(got) == list(range(1, STEPS + 1))
            done[name] = run, got
        return done[name]

    return get


@pytest.mark.parametrize(("source", "target"), CASES, ids=[f"{s}-to-{t}" for s, t in CASES])
def test_resume_at_another_layout_continues_with_equal_losses(corpus, tmp_path, references,
                                                               source, target):
    src_run, want = references(source)
    load = tmp_path / "load"
    load.mkdir()
    tag = f"global_step{SAVE_AT}"
    shutil.copytree(src_run / "ckpt" / tag, load / tag)
    (load / "latest").write_text(tag)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "resume.yml", base_values(
        corpus, run, load=str(load), **{**MODEL, **LAYOUTS[target]}))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 0, explain(proc)
    assert "resharding the model and optimizer state" in proc.stdout, explain(proc)
    got = losses(run)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for it in got:
        assert got[it] == pytest.approx(want[it], rel=1e-5, abs=0), (it, got[it], want[it])
    consumed = [r["consumed_samples"] for r in records(run)]
    assert consumed == [8 * i for i in range(SAVE_AT + 1, STEPS + 1)]


def test_a_changed_model_shape_stops_with_one_line_and_status_2(corpus, tmp_path, references):
    src_run, _ = references("dp2")
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "heads.yml", base_values(
        corpus, run, load=str(src_run / "ckpt"),
        **{**MODEL, **LAYOUTS["dp2"], "num_attention_heads": 2}))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 2, explain(proc)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, explain(proc)
    errors = [line for line in output.splitlines() if "num_attention_heads is 4 in the "
              "checkpoint but 2 in the config" in line]
    assert errors and str(src_run / "ckpt" / f"global_step{STEPS}") in errors[0], explain(proc)
