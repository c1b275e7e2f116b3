"""The PyTorch profiler over a window of training steps (``profile``) and the CUDA allocator
snapshot (``memory_profiling``).

As in GPT-NeoX, the window is given by ``profile_step_start`` and ``profile_step_stop``: the
steps after iteration ``profile_step_start`` up to and including iteration
``profile_step_stop`` are recorded (``profile_step_stop - profile_step_start`` steps, the one
before them a warm-up), and the trace goes to ``tensorboard_dir`` (``<log_dir>/profile``
without one) in the TensorBoard plugin's format: one
``<worker>.<timestamp>.pt.trace.json`` per rank, a Chrome trace that Perfetto and
``chrome://tracing`` open too. Each step is a ``iteration <n>`` range in the trace.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from megatron import accelerator

SNAPSHOT_FILE = "mem_snapshot.pickle"


def trace_dir(tensorboard_dir: str | None, log_dir: str | None) -> str | None:
    if tensorboard_dir:
        return tensorboard_dir
    return str(Path(log_dir) / "profile") if log_dir else None


class StepProfiler:
    """Call :meth:`step` around each training step (``with profiler.step(iteration):``)."""

    def __init__(self, *, start: int, stop: int, directory: str, rank: int,
                 resumed_at: int = 0):
        self.first = max(start + 1, resumed_at + 1)  # first recorded iteration
        self.last = stop
        self._prof: Any = None
        if self.last < self.first:
            return
        # the profiler's step 0 runs before the first training step; step k is iteration
        # resumed_at + k
        offset = self.first - resumed_at
        warmup = min(1, offset - 1)
        schedule = torch.profiler.schedule(wait=offset - warmup, warmup=warmup,
                                           active=self.last - self.first + 1, repeat=1)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if accelerator.is_gpu():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(directory, exist_ok=True)
        self._prof = torch.profiler.profile(
            activities=activities, schedule=schedule,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(
                directory, worker_name=f"rank{rank}"),
            record_shapes=True, profile_memory=True, with_flops=True, with_modules=True)
        self._prof.start()

    @contextlib.contextmanager
    def step(self, iteration: int) -> Any:
        """One training step, ``iteration`` the number it will have once done."""
        if self._prof is None:
            yield
            return
        self._prof.step()
        with torch.profiler.record_function(f"iteration {iteration}"):
            yield
        if iteration >= self.last:
            self.close()

    def close(self) -> None:
        """Stop (writing the trace when the window was reached); idempotent."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.stop()


class MemorySnapshot:
    """The allocator history from start-up; the snapshot is written by rank 0 after iteration
    ``profile_step_stop`` to ``<memory_profiling_path>/mem_snapshot.pickle``."""

    def __init__(self, *, path: str, stop: int, rank: int):
        self.path, self.stop, self.rank = path, stop, rank
        accelerator.record_memory_history()

    def after_step(self, iteration: int) -> None:
        if iteration == self.stop and self.rank == 0:
            os.makedirs(self.path, exist_ok=True)
            accelerator.dump_memory_snapshot(os.path.join(self.path, SNAPSHOT_FILE))
