"""The trainer on one GPU through ``python deepy.py train.py``: bf16, fp16 with the dynamic
loss scaler, torch.compile, FP8, activation checkpointing, checkpoints between GPU and CPU."""

from __future__ import annotations

import math

import pytest
from gpu_helpers import BF16, CPU_RANKS, MODEL, SMALL, max_relative_gap, record, records, train

from megatron import accelerator
from tests.training.e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    run_deepy,
    write_config,
)

STEPS = 12
# bf16 runs of the same model that differ only in the order of floating-point sums (compiled
# kernels, recomputation) stay this close over the first steps
REORDER_TOLERANCE = 2e-2
# FP8 (e4m3, dynamic scaling) against bf16 over the first steps
FP8_TOLERANCE = 5e-2
CROSS_DEVICE_TOLERANCE = 3e-2  # bf16 on GPU vs bf16 on CPU after loading the same weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("gpu_data"))


@pytest.fixture(scope="module")
def bf16_run(data, tmp_path_factory):
    """The reference: bf16 eager."""
    run = tmp_path_factory.mktemp("bf16")
    got = train(data, run, train_iters=STEPS, **BF16)
    return run, got


def test_bf16_trains(bf16_run):
    run, got = bf16_run
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.5, got  # a char-level model learns fast at this lr
    rec = records(run)[-1]
    assert rec["skipped_iters"] == 0
    record("bf16", first_loss=got[1], last_loss=got[STEPS])


def test_fp16_loss_scale_halves_on_overflow_then_grows(data, tmp_path):
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12,
            "loss_scale_window": 2, "hysteresis": 1, "min_loss_scale": 1}
    got = train(data, tmp_path, train_iters=10, fp16=fp16, inject_nonfinite_loss_iters=[5])
    by_iter = {r["iteration"]: r for r in records(tmp_path)}
    assert sorted(by_iter) == list(range(1, 11))
    scale = {i: r["loss_scale"] for i, r in by_iter.items()}
    skipped = {i: r["skipped_iters"] for i, r in by_iter.items()}
    # iterations whose step was skipped (the count is cumulative over the run)
    skipped_at = [i for i in range(1, 11) if skipped[i] > skipped.get(i - 1, 0)]
    assert skipped_at == [5], skipped  # the injected step, and only it
    assert scale[5] == scale[4] / 2, scale  # the scale halves
    assert max(scale[i] for i in range(6, 11)) > scale[5], scale  # then grows back
    finite = [v for i, v in got.items() if i != 5]
    assert all(v is not None and math.isfinite(v) for v in finite), got
    record("fp16_overflow", scale_before=scale[4], scale_after=scale[5],
           scale_end=scale[10], skipped=len(skipped_at),
           ok=scale[5] == scale[4] / 2 and scale[10] > scale[5] and skipped_at == [5])


def test_compiled_matches_eager(data, bf16_run, tmp_path):
    eager = bf16_run[1]
    compiled = train(data, tmp_path, train_iters=STEPS, torch_compile=True, **BF16)
    gap = max_relative_gap(compiled, eager)
    record("compile_vs_eager", max_relative_loss_gap=gap)
    assert gap < REORDER_TOLERANCE, (compiled, eager)


def test_activation_checkpointing_matches(data, bf16_run, tmp_path):
    got = train(data, tmp_path, train_iters=STEPS, checkpoint_activations=True,
                checkpoint_num_layers=1, **BF16)
    gap = max_relative_gap(got, bf16_run[1])
    record("act_ckpt_vs_plain", max_relative_loss_gap=gap)
    assert gap < REORDER_TOLERANCE


def test_fp8_close_to_bf16(data, bf16_run, tmp_path):
    ok, what = accelerator.fp8_support()
    if not ok:  # a GPU without FP8 tensor cores: the run must be refused in one line
        proc = run_deepy(write_config(tmp_path / "c.yml", base_values(
            data, tmp_path, **{**MODEL, **BF16, "train_iters": 2, "fp8_training": True})),
            overrides=["--num_gpus", "1"], timeout=300)
        assert proc.returncode != 0, explain(proc)
        assert "fp8_training: " in proc.stderr and "no FP8 tensor cores" in proc.stderr, \
            explain(proc)
        record("fp8_vs_bf16", refused=what)
        return
    got = train(data, tmp_path, train_iters=STEPS, fp8_training=True, **BF16)
    gap = max_relative_gap(got, bf16_run[1])
    record("fp8_vs_bf16", max_relative_loss_gap=gap, last_loss=got[STEPS],
           bf16_last_loss=bf16_run[1][STEPS])
    assert gap < FP8_TOLERANCE, (got, bf16_run[1])


def test_checkpoints_move_between_gpu_and_cpu(data, tmp_path):
    # every run has the same schedule (train_iters); the first two stop early and save
    small = {**SMALL, **BF16, "train_iters": STEPS + 4}
    saved_on_gpu = str(tmp_path / "first" / "ckpt")
    train(data, tmp_path / "first", save=saved_on_gpu, exit_interval=STEPS, **small)
    # GPU -> CPU: CPU ranks resume the GPU checkpoint, a GPU run resumes it as reference
    cpu = train(data, tmp_path / "cpu", env=CPU_RANKS, load=saved_on_gpu,
                save=str(tmp_path / "cpu" / "ckpt"), exit_interval=STEPS + 2, **small)
    gpu = train(data, tmp_path / "gpu", load=saved_on_gpu, **small)
    assert sorted(cpu) == [STEPS + 1, STEPS + 2], cpu  # resumed, not restarted
    gap_to_cpu = max_relative_gap(cpu, gpu)
    # CPU -> GPU: the GPU resumes what the CPU ranks saved
    back = train(data, tmp_path / "back", load=str(tmp_path / "cpu" / "ckpt"), **small)
    assert sorted(back) == [STEPS + 3, STEPS + 4], back
    gap_back = max_relative_gap(back, gpu)
    record("checkpoint_gpu_cpu", gap_gpu_to_cpu=gap_to_cpu, gap_cpu_to_gpu=gap_back)
    assert gap_to_cpu < CROSS_DEVICE_TOLERANCE, (cpu, gpu)
    assert gap_back < CROSS_DEVICE_TOLERANCE, (back, gpu)
