"""The one place where the framework decides which device it runs on.

Everything else asks this module for the device, the distributed backend, RNG helpers and
memory statistics. It wraps DeepSpeed's accelerator abstraction (``cuda`` on NVIDIA GPUs,
``cpu`` with the gloo backend elsewhere) and picks the CPU accelerator automatically on a
machine without a GPU, before DeepSpeed is imported.

torch is imported where a function needs it, not with this module: deepy.py asks whether the
machine has a GPU before it launches anything, and on a machine that cannot have one (a CPU
build of torch, or no GPU device nodes) it gets the answer without importing torch (seconds).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# device nodes of the NVIDIA driver, AMD's ROCm (kfd) and WSL's GPU paravirtualization
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _torch_gpu_build() -> bool:
    """Whether the installed torch was built for CUDA or ROCm, read from its ``version.py``
    without importing it (True when that file cannot be read)."""
    try:
        spec = importlib.util.find_spec("torch")
        locations = list(spec.submodule_search_locations or []) if spec else []
        with open(os.path.join(locations[0], "version.py")) as f:
            text = f.read()
    except (ImportError, IndexError, OSError, ValueError):
        return True
    return any(re.search(rf"^{name}\s*(?::[^=]*)?=\s*(?!None\b)\S", text, re.MULTILINE)
               for name in ("cuda", "hip"))


def gpu_possible() -> bool:
    """False when this machine certainly has no usable CUDA/ROCm GPU for torch: torch is a
    CPU build, or (on Linux) no GPU device node exists. True means: ask torch."""
    if "torch" in sys.modules:
        return True
    if not _torch_gpu_build():
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(node) for node in GPU_DEVICE_NODES)
    return True


def gpu_present() -> bool:
    """Whether this machine has a usable CUDA GPU (whatever ``DS_ACCELERATOR`` says)."""
    if not gpu_possible():
        return False
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def ensure_accelerator_env() -> str:
    """Set ``DS_ACCELERATOR`` (if unset) so DeepSpeed picks the right accelerator.

    Must run before ``import deepspeed`` anywhere in the process; ``megatron/__init__.py``
    calls it. Returns the accelerator name.
    """
    name = os.environ.get("DS_ACCELERATOR")
    if not name:
        name = "cuda" if gpu_present() else "cpu"
        os.environ["DS_ACCELERATOR"] = name
    return name


@functools.lru_cache(maxsize=1)
def get_accelerator() -> Any:
    """DeepSpeed's accelerator object for this process."""
    ensure_accelerator_env()
    from deepspeed.accelerator import get_accelerator as _ds_get

    return _ds_get()


def accelerator_name() -> str:
    return ensure_accelerator_env()


def is_gpu() -> bool:
    return accelerator_name() != "cpu"


def device(local_rank: int | None = None) -> torch.device:
    """The torch device this rank computes on."""
    import torch

    if not is_gpu():
        return torch.device("cpu")
    idx = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device(get_accelerator().device_name(idx))


def set_device(local_rank: int) -> None:
    if is_gpu():
        get_accelerator().set_device(local_rank)


def communication_backend() -> str:
    """``nccl`` on NVIDIA GPUs, ``gloo`` on CPU ranks."""
    if not is_gpu():
        return "gloo"
    return get_accelerator().communication_backend_name()


def device_count() -> int:
    """Number of local GPUs (0 on a CPU-only machine)."""
    if not gpu_present():
        return 0
    import torch

    return torch.cuda.device_count()


def synchronize() -> None:
    if is_gpu():
        get_accelerator().synchronize()


def manual_seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    if is_gpu():
        get_accelerator().manual_seed_all(seed)


def device_rng_state() -> torch.Tensor | None:
    """RNG state of the compute device (None on CPU, where torch's state covers it)."""
    return get_accelerator().get_rng_state() if is_gpu() else None


def set_device_rng_state(state: torch.Tensor | None) -> None:
    if is_gpu() and state is not None:
        get_accelerator().set_rng_state(state)


def supports_fp16() -> bool:
    """fp16 training needs a GPU (DeepSpeed refuses it on the CPU accelerator)."""
    return is_gpu()


def supports_bf16() -> bool:
    if not is_gpu():
        return True
    return bool(get_accelerator().is_bf16_supported())


def device_name() -> str:
    """Human-readable device name, used to look up the peak FLOP/s for MFU."""
    import torch

    if is_gpu():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def max_memory_allocated() -> int:
    """Peak bytes allocated on the device (0 on CPU; use RSS there)."""
    import torch

    return int(torch.cuda.max_memory_allocated()) if is_gpu() else 0


def flash_attention_available() -> bool:
    """True where PyTorch's SDPA can use the flash kernel (a CUDA GPU)."""
    import torch

    return is_gpu() and torch.backends.cuda.flash_sdp_enabled()


def compute_capability() -> tuple[int, int] | None:
    """CUDA compute capability of this rank's device, or None off CUDA (CPU, other vendors)."""
    import torch

    if accelerator_name() != "cuda" or not gpu_present():
        return None
    major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
    return int(major), int(minor)


FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores


def fp8_support() -> tuple[bool, str]:
    """``(whether this rank's device has FP8 tensor cores, what the device is)``; the
    description names the device for error messages."""
    capability = compute_capability()
    if capability is None:
        where = "CPU" if not is_gpu() else f"accelerator {accelerator_name()!r}"
        return False, f"this rank computes on {where}"
    label = f"{device_name()} (compute capability {capability[0]}.{capability[1]})"
    return capability >= FP8_MIN_CAPABILITY, label


def reset_peak_memory_stats() -> None:
    import torch

    if is_gpu():
        torch.cuda.reset_peak_memory_stats()


def record_memory_history(max_entries: int = 100_000) -> None:
    """Start recording the CUDA caching allocator's history (for :func:`dump_memory_snapshot`);
    a ``RuntimeError`` off CUDA."""
    if accelerator_name() != "cuda" or not gpu_present():
        raise RuntimeError("memory_profiling needs CUDA ranks (the CUDA caching allocator's "
                           "history); this rank computes on CPU")
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


def dump_memory_snapshot(path: str) -> None:
    """Write the allocator snapshot (viewable at pytorch.org/memory_viz) to ``path``."""
    torch.cuda.memory._dump_snapshot(path)
