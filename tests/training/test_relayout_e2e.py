"""Resuming through deepy.py at another parallel layout than the one that saved.

Every layout sees the same global batch (8 samples per step) from the same seed, so the losses
of all layouts agree (within 1e-5 relative, fp32): one reference run (DP=2, ZeRO-0) trains the
whole schedule. A chain of runs then resumes each from the previous one's checkpoint at another
layout for one step; the chain passes through both directions of every pair (TP 2 <-> 1,
PP 2 <-> 1 (no pipeline engine), DP 2 ZeRO-1 <-> DP 1, ZeRO-3 <-> ZeRO-0), and every step's loss equals the
reference's. Optimizer moments, the LR schedule, the data position and the RNG must all carry
over for that to hold.
"""

from __future__ import annotations

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

MODEL = {"no_weight_tying": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
         "gradient_accumulation_steps": None, "num_layers": 2, "hidden_size": 32,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.003}}, "warmup": 0.0,
         "gradient_clipping": 1.0}
LAYOUTS: dict[str, dict[str, Any]] = {
    "tp2": {"num_gpus": 2, "model_parallel_size": 2},
    "dp2": {"num_gpus": 2},  # tensor parallel 1, ZeRO 0
    "pp2": {"num_gpus": 2, "pipe_parallel_size": 2},
    "dp2_zero1": {"num_gpus": 2, "zero_optimization": {"stage": 1}},
    "dp1_zero1": {"num_gpus": 1, "zero_optimization": {"stage": 1}},
    "zero3": {"num_gpus": 2, "zero_optimization": {"stage": 3}},
}
# each run resumes the previous one's checkpoint at its own layout
CHAIN = ["tp2", "dp2", "zero3", "dp2", "pp2", "dp2", "tp2", "dp2_zero1", "dp1_zero1",
         "dp2_zero1"]
REQUIRED = {("tp2", "dp2"), ("dp2", "tp2"), ("pp2", "dp2"), ("dp2", "pp2"),
            ("dp2_zero1", "dp1_zero1"), ("dp1_zero1", "dp2_zero1"), ("zero3", "dp2"),
            ("dp2", "zero3")}
STEPS = len(CHAIN)


def test_the_chain_covers_both_directions_of_every_pair():
    assert REQUIRED <= set(zip(CHAIN, CHAIN[1:]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"), max_docs=120)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    cfg = write_config(tmp / "ref.yml", base_values(
        corpus, run, train_iters=STEPS, **{**MODEL, **LAYOUTS["dp2"]}))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 0, explain(proc)
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


@pytest.fixture(scope="module")
def chain(corpus, tmp_path_factory, reference):
    """Runs the chain; returns its runs' (layout, losses, stdout, consumed samples) in order,
    and the checkpoint directory."""
    tmp = tmp_path_factory.mktemp("chain")
    ckpt = tmp / "ckpt"
    out = []
    for step, layout in enumerate(CHAIN, start=1):
        run = tmp / f"{step:02d}_{layout}"
        cfg = write_config(tmp / f"{step:02d}.yml", base_values(
            corpus, run, save=str(ckpt), load=str(ckpt), train_iters=STEPS, exit_interval=step,
            **{**MODEL, **LAYOUTS[layout]}))
        proc = run_deepy("configs/tiny_neox.yml", cfg)
        assert proc.returncode == 0, f"{layout} (step {step}): {explain(proc)}"
        consumed = [r["consumed_samples"] for r in records(run)]
        out.append((layout, losses(run), proc.stdout, consumed))
    return out, ckpt


@pytest.mark.parametrize("index", range(1, STEPS), ids=[
    f"{a}-to-{b}" for a, b in zip(CHAIN, CHAIN[1:])])
def test_resume_at_another_layout_continues_with_equal_losses(chain, reference, index):
    runs, _ckpt = chain
    layout, got, stdout, consumed = runs[index]
    before = runs[index - 1][0]
    if LAYOUTS[before] != LAYOUTS[layout]:
        assert "resharding the model and optimizer state" in stdout, stdout[-3000:]
    step = index + 1
    assert sorted(got) == [step], (layout, got)
    assert got[step] == pytest.approx(reference[step], rel=1e-5, abs=0), (before, layout)
    assert consumed == [8 * step]


def test_the_first_run_of_the_chain_equals_the_reference(chain, reference):
    layout, got, _stdout, _ = chain[0][0]
    assert got[1] == pytest.approx(reference[1], rel=1e-5, abs=0), layout


def test_a_changed_model_shape_stops_with_one_line_and_status_2(corpus, tmp_path, chain):
    _runs, ckpt = chain
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "heads.yml", base_values(
        corpus, run, load=str(ckpt), train_iters=STEPS,
        **{**MODEL, **LAYOUTS["dp2"], "num_attention_heads": 2}))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 2, explain(proc)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, explain(proc)
    errors = [line for line in output.splitlines() if "num_attention_heads is 4 in the "
              "checkpoint but 2 in the config" in line]
    assert errors and str(ckpt / f"global_step{STEPS}") in errors[0], explain(proc)
