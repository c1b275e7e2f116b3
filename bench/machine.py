"""The machine a benchmark runs on: declared CPU peak, measured GEMM throughput, versions."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil


def cpu_peak() -> dict[str, Any]:
    """Declared dense fp32 peak of this machine's cores: cores x FLOP/cycle x clock.

    FLOP/cycle per core: 2 FMA pipes x vector lanes x 2 (AVX-512: 16 lanes, AVX2+FMA: 8 lanes,
    otherwise SSE: 4 lanes without FMA -> 8). The clock is the nominal one of /proc/cpuinfo (no
    boost). There is no faster bf16 path without AVX512-BF16/AMX, so the same peak is the
    reference for bf16 runs (as a GPU's one 16-bit peak is for every precision)."""
    flags = set()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512, 2 FMA pipes"
    elif "fma" in flags and "avx2" in flags:
        per_cycle, isa = 32, "AVX2+FMA, 2 FMA pipes"
    else:
        per_cycle, isa = 8, "SSE"
    cores = os.cpu_count() or 1
    ghz = (mhz or 2000.0) / 1000.0
    tflops = cores * per_cycle * ghz / 1000.0
    return {
        "tflops": tflops,
        "derivation": f"{cores} cores x {per_cycle} fp32 FLOP/cycle ({isa}) x {ghz:.3f} GHz "
                      f"(nominal clock) = {tflops * 1000:.1f} GFLOP/s",
        "bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


def measured_gemm_tflops(threads: int, size: int = 1536, repeat: int = 5) -> dict[str, float]:
    """Best-of-``repeat`` dense GEMM throughput (fp32 and bf16) with ``threads`` threads."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        for name, dtype, n in (("fp32", torch.float32, size), ("bf16", torch.bfloat16, 512)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - t0)
            out[name] = 2 * n**3 / best / 1e12
    finally:
        torch.set_num_threads(prev)
    return out


def environment() -> dict[str, Any]:
    import deepspeed
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "numpy": numpy.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
