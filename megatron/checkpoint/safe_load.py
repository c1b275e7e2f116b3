"""Loading checkpoint files without running code: ``torch.load(weights_only=True)``.

Every checkpoint or conversion file goes through :func:`load_file`; the DeepSpeed engine's own
loads go through :class:`SafeCheckpointEngine` (swapped in for the duration of a load by
:func:`safe_engine_loads`). Only tensors, containers, numbers and strings load, plus a short
list of data-only classes that DeepSpeed and numpy put into the files they write (loss-scaler
settings, the ZeRO stage enum, tensor-fragment addresses, numpy arrays in RNG states written
by older versions). A file that needs anything else -- a pickle whose ``__reduce__`` would
call a function -- is refused with one line naming the file and the global it asked for.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint.manifest import CheckpointError

_UNSAFE = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _data_classes() -> list[Any]:
    """Data-only classes found in the files DeepSpeed (and numpy) write."""
    import numpy as np

    found: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.int64)),
                        type(np.dtype(np.float64))]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    if core is not None:
        found.append(core.multiarray._reconstruct)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        found += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        found.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        found.append(fragment_address)
    return found


def _refusal(path: Any, exc: Exception) -> CheckpointError:
    text = str(exc)
    match = _UNSAFE.search(text)
    if match is not None:
        return CheckpointError(
            f"{path}: refused: loading it would call {match.group(1)} (checkpoint files are "
            "loaded with torch.load(weights_only=True), which runs no code from the file)")
    if "Weights only load failed" in text:
        return CheckpointError(f"{path}: refused: it holds objects other than tensors, "
                               "containers, numbers and strings (checkpoint files are loaded "
                               "with torch.load(weights_only=True))")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {first[:200]})")


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` a checkpoint file with ``weights_only=True``; one-line errors."""
    try:
        with torch.serialization.safe_globals(_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and weights-only errors alike
        raise _refusal(path, exc) from None


class SafeCheckpointEngine:
    """Delegates to a DeepSpeed checkpoint engine, with loads through :func:`load_file`."""

    def __init__(self, inner: Any):
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def safe_engine_loads(engine: Any) -> Iterator[None]:
    """Within the block, ``engine`` (a DeepSpeed engine) reads its files with
    ``weights_only=True``."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None:
        yield
        return
    engine.checkpoint_engine = SafeCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
