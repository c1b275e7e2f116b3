"""Rerunning some benchmark cases replaces them and keeps what they measured before."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_train import merge_results  # noqa: E402


def _run(total: float, cases: dict) -> dict:
    return {"environment": {"load_average_at_start": [total, 0, 0]}, "total_seconds": total,
            "quick": False, "measured_gemm_tflops": {}, "cpu_peak": {}, "cases": cases}


def test_merge_replaces_rerun_cases_and_keeps_their_earlier_ratios():
    old = _run(100.0, {"a": {"ratio": {"pooled": 0.9, "pairs": [0.9]}, "measured_at": "t0"},
                       "b": {"ratio": {"pooled": 1.0, "pairs": [1.0]}, "measured_at": "t0"}})
    new = _run(50.0, {"a": {"ratio": {"pooled": 1.1, "pairs": [1.1]}, "measured_at": "t1"}})

    merged = merge_results(old, new)

    assert merged["cases"]["a"]["ratio"]["pooled"] == 1.1
    assert merged["cases"]["b"] == old["cases"]["b"]
    assert merged["total_seconds"] == 50.0
    (earlier,) = merged["earlier_runs"]
    assert earlier["total_seconds"] == 100.0
    assert earlier["replaced"] == {"a": {"ratio": {"pooled": 0.9, "pairs": [0.9]},
                                         "dp_scaling": None, "measured_at": "t0"}}

    again = merge_results(merged, _run(10.0, {"b": {"ratio": {"pooled": 0.8}}}))
    assert [run["total_seconds"] for run in again["earlier_runs"]] == [100.0, 50.0]
    assert again["earlier_runs"][1]["replaced"]["b"]["ratio"]["pooled"] == 1.0
