"""Model FLOPs utilization: achieved training FLOP/s over the devices' dense peak.

    achieved TFLOP/s per device = tokens_per_sec * flops_per_token / num_devices / 1e12
    MFU                         = achieved TFLOP/s per device / peak TFLOP/s per device

The peak is the dense 16-bit (BF16, or FP16 where the device has no BF16) tensor-core figure
from the vendor's datasheet, never the "with sparsity" figure, looked up by the device name
:func:`megatron.accelerator.device_name` reports. It is the reference whatever precision the
run trains in, so an fp32 run shows a low MFU. ``peak_theoretical_tflops`` in the config
overrides the table. A CPU, or a device missing from the table, has no peak unless the config
sets one: MFU is then reported as n/a (no benchmark-based guess, so the number never depends
on the machine's load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PeakEntry:
    pattern: str  # regular expression matched (case-insensitively) against the device name
    label: str
    tflops: float  # dense BF16/FP16 tensor-core TFLOP/s of one device


# Dense 16-bit tensor-core peaks. Datasheets print most of them as "X | 2X*" where the starred
# figure assumes 2:4 structured sparsity; the dense X is listed here. Order matters: the first
# matching pattern wins, so specific names come before the names they contain.
PEAK_TABLE: tuple[PeakEntry, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 (SXM) / 1,513 (PCIe) / 1,671 (NVL)
    # TFLOPS with sparsity.
    PeakEntry(r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe", 756.5),
    PeakEntry(r"\bH100\b.*\bNVL\b", "NVIDIA H100 NVL", 835.5),
    PeakEntry(r"\bH100\b", "NVIDIA H100 SXM", 989.5),
    # NVIDIA GH200 Grace Hopper superchip datasheet: same Hopper GPU, BF16 1,979 with sparsity.
    PeakEntry(r"\bGH200\b", "NVIDIA GH200", 989.5),
    # NVIDIA H200 datasheet: BF16 1,979 (SXM) / 1,671 (NVL) TFLOPS with sparsity.
    PeakEntry(r"\bH200\b.*\bNVL\b", "NVIDIA H200 NVL", 835.5),
    PeakEntry(r"\bH200\b", "NVIDIA H200 SXM", 989.5),
    # NVIDIA A100 datasheet: BF16/FP16 tensor 312 | 624* TFLOPS (40GB and 80GB, SXM and PCIe).
    PeakEntry(r"\bA100\b", "NVIDIA A100", 312.0),
    # NVIDIA A10G datasheet (AWS G5): BF16/FP16 tensor 70 | 140* TFLOPS.
    PeakEntry(r"\bA10G\b", "NVIDIA A10G", 70.0),
    # NVIDIA A10 datasheet: BF16/FP16 tensor 125 | 250* TFLOPS.
    PeakEntry(r"\bA10\b", "NVIDIA A10", 125.0),
    # NVIDIA L40S datasheet: BF16/FP16 tensor 362.05 | 733* TFLOPS.
    PeakEntry(r"\bL40S\b", "NVIDIA L40S", 362.05),
    # NVIDIA L40 datasheet: BF16/FP16 tensor 181.05 | 362.1* TFLOPS.
    PeakEntry(r"\bL40\b", "NVIDIA L40", 181.05),
    # NVIDIA L4 datasheet: BF16/FP16 tensor 242* TFLOPS with sparsity -> 121 dense.
    PeakEntry(r"\bL4\b", "NVIDIA L4", 121.0),
    # NVIDIA V100 datasheet: FP16 tensor 125 (SXM2) / 112 (PCIe) TFLOPS; V100S PCIe: 130. No
    # BF16 on Volta.
    PeakEntry(r"\bV100S\b", "NVIDIA V100S PCIe", 130.0),
    PeakEntry(r"\bV100\b.*\bPCIE\b", "NVIDIA V100 PCIe", 112.0),
    PeakEntry(r"\bV100\b", "NVIDIA V100 SXM2", 125.0),
    # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP16/BF16 tensor with FP32
    # accumulate 165.2 | 330.4* TFLOPS.
    PeakEntry(r"\bRTX 4090\b", "NVIDIA GeForce RTX 4090", 165.2),
    # NVIDIA Ampere GA102 whitepaper (RTX 3090): FP16/BF16 tensor with FP32 accumulate
    # 71 | 142* TFLOPS.
    PeakEntry(r"\bRTX 3090\b(?!\s*Ti)", "NVIDIA GeForce RTX 3090", 71.0),
    # AMD Instinct MI250X datasheet: peak BF16/FP16 383.0 TFLOPS (no sparsity).
    PeakEntry(r"\bMI250X\b", "AMD Instinct MI250X", 383.0),
    # AMD Instinct MI300X datasheet: peak BF16/FP16 1307.4 | 2614.9 (sparsity) TFLOPS.
    PeakEntry(r"\bMI300X\b", "AMD Instinct MI300X", 1307.4),
)


def lookup_peak(device_name: str) -> PeakEntry | None:
    """The table entry for a device name such as ``NVIDIA A100-SXM4-80GB``, or None."""
    for entry in PEAK_TABLE:
        if re.search(entry.pattern, device_name, flags=re.IGNORECASE):
            return entry
    return None


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """``(peak TFLOP/s of one device or None, where the number comes from)``."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak_theoretical_tflops must be positive, got {override}")
        return float(override), f"peak_theoretical_tflops = {override:g} TFLOP/s (config)"
    entry = lookup_peak(device_name)
    if entry is None:
        return None, (f"no peak FLOP/s known for device {device_name!r}: MFU is reported as "
                      "n/a (set peak_theoretical_tflops)")
    return entry.tflops, (f"{entry.label}: dense BF16/FP16 peak {entry.tflops:g} TFLOP/s "
                          f"(datasheet table, device {device_name!r})")


def achieved_tflops(tokens_per_sec: float, flops_per_token: float, num_devices: int) -> float:
    """Training TFLOP/s achieved per device."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    return tokens_per_sec * flops_per_token / num_devices / 1e12


def mfu(tokens_per_sec: float, flops_per_token: float, peak_tflops: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilization as a fraction (0.42 = 42%), or None without a peak."""
    if peak_tflops is None:
        return None
    if peak_tflops <= 0:
        raise ValueError(f"peak TFLOP/s must be positive, got {peak_tflops}")
    return achieved_tflops(tokens_per_sec, flops_per_token, num_devices) / peak_tflops
