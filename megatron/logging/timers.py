"""Named wall-clock timers for the ``wall_clock_breakdown`` line.

``timers("forward").start()`` ... ``timers("forward").stop()`` accumulates; ``elapsed`` reads
(and by default resets) the total. GPU work is asynchronous, so a timer built with
``synchronize=True`` (or a start/stop call passing it) first waits for the device through
:func:`megatron.accelerator.synchronize`; on CPU that is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from megatron import accelerator

BREAKDOWN = ("forward", "backward", "optimizer", "data")


class Timer:
    def __init__(self, name: str, *, synchronize: bool = False) -> None:
        self.name = name
        self.synchronize = synchronize
        self._total = 0.0
        self._started: float | None = None
        self.count = 0  # completed start/stop intervals since the last reset

    @property
    def running(self) -> bool:
        return self._started is not None

    def _sync(self, synchronize: bool | None) -> None:
        if self.synchronize if synchronize is None else synchronize:
            accelerator.synchronize()

    def start(self, *, synchronize: bool | None = None) -> None:
        if self._started is not None:
            raise RuntimeError(f"timer {self.name!r} is already running")
        self._sync(synchronize)
        self._started = time.perf_counter()

    def stop(self, *, synchronize: bool | None = None) -> None:
        if self._started is None:
            raise RuntimeError(f"timer {self.name!r} is not running")
        self._sync(synchronize)
        self._total += time.perf_counter() - self._started
        self._started = None
        self.count += 1

    def reset(self) -> None:
        self._total = 0.0
        self.count = 0
        if self._started is not None:
            self._started = time.perf_counter()

    def elapsed(self, *, reset: bool = True) -> float:
        """Seconds accumulated (including the running interval, if any)."""
        total = self._total
        if self._started is not None:
            total += time.perf_counter() - self._started
        if reset:
            self.reset()
        return total

    @contextmanager
    def timing(self) -> Iterator[Timer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class Timers:
    """A set of :class:`Timer` objects created on first use by name."""

    def __init__(self, *, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = Timer(name, synchronize=self.synchronize)
        return timer

    def __contains__(self, name: str) -> bool:
        return name in self._timers

    def names(self) -> list[str]:
        return list(self._timers)

    def elapsed(self, names: Sequence[str] | None = None, *,
                reset: bool = True) -> dict[str, float]:
        """Seconds per timer (those never used are left out)."""
        wanted = self.names() if names is None else [n for n in names if n in self._timers]
        return {n: self._timers[n].elapsed(reset=reset) for n in wanted}

    def breakdown_line(self, names: Sequence[str] = BREAKDOWN, *, normalizer: float = 1.0,
                       reset: bool = True) -> str:
        """``time (ms) | forward: 12.34 | backward: ...``, each total divided by ``normalizer``
        (the iterations since the last call, for per-iteration averages)."""
        if normalizer <= 0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        parts = [f"{name}: {1000.0 * seconds / normalizer:.2f}"
                 for name, seconds in self.elapsed(names, reset=reset).items()]
        return "time (ms) | " + " | ".join(parts) if parts else "time (ms) | (no timers)"
