"""Peak FLOP/s table lookup, the override, MFU arithmetic and the named timers."""

from __future__ import annotations

import pytest

from megatron.logging import timers as timers_mod
from megatron.logging.mfu import PEAK_TABLE, achieved_tflops, lookup_peak, mfu, peak_tflops
from megatron.logging.timers import Timers


@pytest.mark.parametrize("name, label, tflops", [
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 312.0),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.5),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.5),
    ("NVIDIA GH200 480GB", "NVIDIA GH200", 989.5),
    ("NVIDIA A10", "NVIDIA A10", 125.0),
    ("NVIDIA A10G", "NVIDIA A10G", 70.0),
    ("NVIDIA L4", "NVIDIA L4", 121.0),
    ("NVIDIA L40S", "NVIDIA L40S", 362.05),
    ("Tesla V100-SXM2-32GB", "NVIDIA V100 SXM2", 125.0),
    ("Tesla V100-PCIE-16GB", "NVIDIA V100 PCIe", 112.0),
    ("Tesla V100S-PCIE-32GB", "NVIDIA V100S PCIe", 130.0),
    ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", 71.0),
    ("AMD Instinct MI250X", "AMD Instinct MI250X", 383.0),
    ("AMD Instinct MI300X", "AMD Instinct MI300X", 1307.4),
])
def test_table_lookup(name: str, label: str, tflops: float) -> None:
    entry = lookup_peak(name)
    assert entry is not None and (entry.label, entry.tflops) == (label, tflops)
    peak, source = peak_tflops(name, None)
    assert peak == tflops and label in source and name in source


@pytest.mark.parametrize("name", ["cpu", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA T4", "Tesla P100"])
def test_unknown_devices_have_no_peak(name: str) -> None:
    peak, source = peak_tflops(name, None)
    assert peak is None and "n/a" in source and "peak_theoretical_tflops" in source


def test_override_wins_over_table() -> None:
    assert peak_tflops("NVIDIA A100-SXM4-80GB", 200.0)[0] == 200.0
    peak, source = peak_tflops("cpu", 1.5)
    assert peak == 1.5 and "config" in source
    with pytest.raises(ValueError, match="positive"):
        peak_tflops("cpu", 0.0)


def test_table_holds_dense_not_sparse_numbers() -> None:
    by_label = {e.label: e.tflops for e in PEAK_TABLE}
    # datasheets print 1,979 (H100 SXM) and 624 (A100) with sparsity: half is dense
    assert by_label["NVIDIA H100 SXM"] == pytest.approx(1979 / 2)
    assert by_label["NVIDIA A100"] == pytest.approx(624 / 2)
    assert len(by_label) == len(PEAK_TABLE)  # labels are unique


def test_mfu_formula() -> None:
    # 8 devices, 1e6 tokens/s, 6e9 FLOPs/token -> 6e15 FLOP/s total, 750 TFLOP/s per device
    assert achieved_tflops(1e6, 6e9, 8) == pytest.approx(750.0)
    assert mfu(1e6, 6e9, 989.5, 8) == pytest.approx(750.0 / 989.5)
    assert mfu(1e6, 6e9, None, 8) is None
    with pytest.raises(ValueError):
        achieved_tflops(1.0, 1.0, 0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timers_accumulate_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timers_mod.time, "perf_counter", clock)
    timers = Timers()
    for _ in range(2):
        timers("forward").start()
        clock.now += 0.25
        timers("forward").stop()
        with timers("backward").timing():
            clock.now += 0.5
    timers("optimizer").start()
    clock.now += 0.1
    assert timers("optimizer").running
    assert timers.elapsed(["forward", "backward"], reset=False) == \
        pytest.approx({"forward": 0.5, "backward": 1.0})
    assert timers("forward").count == 2
    line = timers.breakdown_line(normalizer=2)
    assert line == "time (ms) | forward: 250.00 | backward: 500.00 | optimizer: 50.00"
    assert timers.elapsed(["forward", "data"]) == {"forward": 0.0}  # reset; data never used
    with pytest.raises(RuntimeError, match="not running"):
        timers("backward").stop()
    with pytest.raises(RuntimeError, match="already running"):
        timers("optimizer").start()


def test_timers_synchronize_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(timers_mod.accelerator, "synchronize", lambda: calls.append(1))
    plain = Timers()
    plain("a").start()
    plain("a").stop()
    assert calls == []
    plain("b").start(synchronize=True)
    plain("b").stop(synchronize=True)
    assert len(calls) == 2
    synced = Timers(synchronize=True)
    with synced("c").timing():
        pass
    assert len(calls) == 4
