"""Resumable, data-parallel batch sampling and the training data loader.

``MegatronPretrainingSampler(total_samples, consumed_samples, micro_batch_size,
data_parallel_rank, data_parallel_size, drop_last=True)`` walks the dataset in order from
``consumed_samples`` (a global count, as saved in checkpoints). Every step takes the next
``micro_batch_size * data_parallel_size`` samples -- one global micro-batch -- and yields this
rank's contiguous slice of it. Resuming with the consumed count of a checkpoint continues
exactly where training stopped: no sample is replayed or skipped. Randomness comes from the
dataset's own shuffle index, so the sampler itself is deterministic.

``build_data_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size,
num_workers)`` wraps it in a ``torch.utils.data.DataLoader`` whose batches are dicts with
``"text"`` (int64 ``[b, seq_length + 1]``) and ``"label"`` when the dataset has labels.
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


class MegatronPretrainingSampler:
    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} is not in [0, {data_parallel_size})"
            )
        if consumed_samples < 0 or consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside the dataset of {total_samples} samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        if self.drop_last:
            return remaining // self.global_micro_batch
        return -(-remaining // self.global_micro_batch)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.data_parallel_rank * self.micro_batch_size
        hi = lo + self.micro_batch_size
        start = self.consumed_samples
        while start + self.global_micro_batch <= self.total_samples:
            yield list(range(start + lo, start + hi))
            start += self.global_micro_batch
        if not self.drop_last and start < self.total_samples:
            tail = list(range(start, self.total_samples))[lo:hi]
            if tail:
                yield tail


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack sample dicts into int64 tensors ``[b, ...]`` per key."""
    keys = samples[0].keys()
    return {
        k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples]).astype(np.int64))
        for k in keys
    }


def build_data_loader(
    dataset: Any,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 2,
    *,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader over this rank's slice of every global micro-batch (None without data)."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        drop_last=drop_last,
    )
    # A private generator: creating the loader's iterator draws a worker base seed, which
    # must not advance the global torch RNG (exact resume depends on that RNG stream).
    generator = torch.Generator()
    generator.manual_seed(consumed_samples)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: SIGTERM and SIGINT are for the rank, which saves at the next step
    boundary and then shuts its workers down. A whole process group signalled at once (Slurm
    preemption, Ctrl-C) reaches the workers too, and a worker dying of it would end the rank
    with an error before it could save."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def reap_loader_workers() -> None:
    """SIGKILL the daemonic multiprocessing children still running (data-loader workers),
    at exit. The workers ignore SIGTERM (``ignore_stop_signals``), and multiprocessing's own
    exit handler would send them SIGTERM and then wait for them forever. Registered with
    ``atexit`` when this module is imported (so it runs before multiprocessing's handler) and
    called by the ranks' exit path."""
    import multiprocessing
    import signal

    children = [p for p in multiprocessing.active_children() if p.daemon]
    if not children:
        return
    with contextlib.suppress(ValueError):  # torch's loader reports a worker's death (SIGCHLD)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


atexit.register(reap_loader_workers)
