"""SIGTERM/SIGINT as a request to stop at the next step boundary (standard library only).

``train.py`` creates a :class:`StopSignal` before anything heavy is imported, so a signal that
reaches a rank at any moment -- while it imports torch, joins the rendezvous, builds the model,
trains or saves -- is recorded instead of killing the process or raising KeyboardInterrupt in
the middle of a collective. The training loop polls :attr:`received` at each step boundary (and
all-reduces it, so a signal that reached one rank stops all of them at the same iteration).
Once a stop was requested the handlers stay in place until the process exits: the launcher,
the rank guard, Slurm and a user pressing Ctrl-C twice may each deliver the signal again, and
none of those copies may interrupt the save.
"""

from __future__ import annotations

import signal
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# rank 0's last line after a stop on a signal, which deepy.py reads:
#   stopped on SIGTERM at iteration 14; checkpoint: runs/x/checkpoints/global_step14
STOP_LINE = "stopped on"


class StopSignal:
    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "no signal"

    def disable(self) -> None:
        """Give the signals back their previous handlers (``save_on_signal: false``, or the
        run is over); a signal already recorded is delivered again under those handlers."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.received is not None:
            signal.raise_signal(self.received)

    def release(self) -> None:
        """The run is over: with no stop requested, the previous handlers come back; after a
        stop, further copies of the signal are ignored while the process shuts down and exits
        0 (ignored at the OS level: Python puts its own handlers back to the default while the
        interpreter finalizes, and a late copy would then kill the process)."""
        if self.received is None:
            self.disable()
            return
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
