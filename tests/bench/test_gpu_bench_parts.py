"""The GPU benchmark, check and report on a CPU machine: they say they need a GPU, and the
summary table and README rows are built from result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_summary  # noqa: E402
import report  # noqa: E402
from bench_gpu import loss_gaps  # noqa: E402


def _case(mode, losses, mfu=0.5):
    return {"model": "1.3B", "mode": mode, "device": "NVIDIA H200", "micro_batch": 4,
            "tokens_per_s": 40000.0, "tflops": 494.0, "mfu": mfu, "peak_memory_gb": 30.0,
            "warmup_s": 50.0, "losses": losses}


def test_bench_gpu_and_gpu_check_need_a_gpu():
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=no_gpu)
    assert proc.returncode == 0
    assert "needs a CUDA GPU" in proc.stdout and "nothing was measured" in proc.stdout
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**no_gpu, "GPU_PY": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "make gpu-check needs a CUDA GPU" in proc.stdout
    assert not (ROOT / "runs" / "gpu-check" / "tests.log").exists() or "passed" not in \
        (ROOT / "runs" / "gpu-check" / "tests.log").read_text()


def test_loss_gap_and_report_rows():
    cases = [_case("bf16-eager", [10.0, 9.0]), _case("fp8-compiled", [10.1, 9.0], 0.6)]
    loss_gaps(cases)
    assert abs(cases[1]["max_relative_loss_gap"] - 0.01) < 1e-9
    assert "max_relative_loss_gap" not in cases[0]
    lines = report.gpu_section({"device": "NVIDIA H200", "cases": cases, "torch": "2.x",
                                "date": "today"})
    rows = [line for line in lines if line.startswith("| NVIDIA H200")]
    assert len(rows) == 2
    assert "| 60.0% |" in rows[1] and "1.00%" in rows[1]
    assert "Not measured yet" in report.gpu_section(None)[-1]


def test_summary_table(tmp_path, capsys):
    tests = tmp_path / "tests.jsonl"
    tests.write_text("\n".join(json.dumps(r) for r in [
        {"name": "fp16_overflow", "scale_before": 8192.0, "scale_after": 4096.0,
         "scale_end": 16384.0, "skipped": 1, "ok": True},
        {"name": "compile_vs_eager", "max_relative_loss_gap": 0.001},
        {"name": "fp8_vs_bf16", "max_relative_loss_gap": 0.02},
    ]))
    bench = tmp_path / "gpu.json"
    cases = [_case("bf16-eager", [10.0]), _case("fp8-compiled", [10.2], 0.7)]
    loss_gaps(cases)
    bench.write_text(json.dumps({"device": "NVIDIA H200", "cases": cases}))
    code = gpu_summary.main(["--tests", str(tests), "--bench", str(bench),
                             "--tests-log", str(tmp_path / "none.log")])
    out = capsys.readouterr().out
    assert code == 0
    assert "loss scale 8192 -> 4096, 1 step skipped, 16384 at the end: ok" in out
    assert "1.3B fp8-compiled" in out and "MFU 70.00%" in out and "loss gap to bf16 2.00%" in out
    assert "result" in out and "PASS" in out
    rows, ok = gpu_summary.rows({}, None, Namespace(tests_rc=1, bench_rc=0, tests_log="x",
                                                    tests_seconds=1, bench_seconds=1))
    assert not ok and ("fp16 overflow", "not measured") in rows


def test_pytest_counts_reads_the_quiet_summary(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("....F.\n=== short test summary info ===\nFAILED x\n"
                   "1 failed, 5 passed, 2 warnings in 12.34s (0:00:12)\n")
    assert gpu_summary.pytest_counts(log) == "1 failed, 5 passed, 2 warnings"
    log.write_text("no tests ran\n")
    assert gpu_summary.pytest_counts(log) == "no pytest summary"
