"""How a job's output says that a rank or a node failed, and which failure to blame.

The rank guard (:mod:`megatron.launch.rank_guard`) writes one line when its rank dies; mpirun,
srun and pdsh have lines of their own. :mod:`megatron.launch.supervise` reads the launcher's
stderr through :func:`parse_failure` and names the rank :func:`first_failure` picks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RankFailure:
    """One line of a job's output that says a rank (or a node) failed."""

    source: str  # "guard", "mpirun", "srun" or "pdsh"
    how: str  # "was killed by SIGKILL", "exited with status 1", ...
    rank: int | None = None
    host: str | None = None
    pid: int | None = None
    after_stop: bool = False  # the rank had been asked to stop (SIGTERM) before it failed

    def describe(self) -> str:
        if self.rank is None:
            return f"node {self.host}: {self.how}"
        where = " ".join(p for p in (f"pid {self.pid}" if self.pid else "",
                                      f"on {self.host}" if self.host else "") if p)
        return f"rank {self.rank}" + (f" ({where})" if where else "") + f" {self.how}"


# rank 0's last line after a stop on a signal (megatron.training.stop_signal.STOP_LINE)
_STOP_RE = re.compile(r"^stopped on (SIG[A-Z0-9]+) at iteration (\d+); (.+?)\s*$")


def parse_stop(line: str) -> str | None:
    """The stop line's text (signal, iteration, checkpoint) when ``line`` is rank 0's report
    that the run stopped on a signal after saving."""
    m = _STOP_RE.match(line)
    return f"{m.group(1)} at iteration {m.group(2)}; {m.group(3)}" if m else None


_GUARD_RE = re.compile(r"\[rank-guard\] rank (\?|\d+) \(pid (\d+) on (\S+)\) "
                       r"(was killed by \S+|exited with status \d+)(?: at \S+)?"
                       r"(?: \(after (\w+)\))?")
_MPIRUN_RE = re.compile(r"process rank (\d+) with PID (\d+) on node (\S+) "
                        r"(exited on signal \d+(?: \([^)]*\))?|exited with non-zero status \d+)")
_SRUN_RE = re.compile(r"srun: error: (\S+): tasks? (\d+)[\d,\-]*: (.+?)\s*$")
_PDSH_RE = re.compile(r"pdsh@\S+: (\S+): ssh exited with exit code (\d+)")


def parse_failure(line: str) -> RankFailure | None:
    """A :class:`RankFailure` when ``line`` reports one: the rank guard's line, mpirun's
    "process rank N ... exited on signal", srun's "task N: ...", pdsh's "ssh exited with
    exit code N" (non-zero)."""
    if m := _GUARD_RE.search(line):
        rank = None if m.group(1) == "?" else int(m.group(1))
        return RankFailure("guard", m.group(4), rank, m.group(3), int(m.group(2)),
                           after_stop=m.group(5) is not None)
    if m := _MPIRUN_RE.search(line):
        pid = int(m.group(2)) or None
        return RankFailure("mpirun", m.group(4), int(m.group(1)), m.group(3), pid)
    if m := _SRUN_RE.search(line):
        if m.group(3).startswith(("Terminated", "Exited with exit code 0")):
            return None  # stopped by srun after another task failed
        return RankFailure("srun", m.group(3), int(m.group(2)), m.group(1))
    if (m := _PDSH_RE.search(line)) and m.group(2) != "0":
        return RankFailure("pdsh", f"its launcher exited with status {m.group(2)}",
                           host=m.group(1))
    return None


def first_failure(failures: list[RankFailure]) -> RankFailure | None:
    """The failure to blame: the first rank that failed on its own (not while being stopped),
    named by the rank guard when it was; else the first reported."""
    for pick in (lambda f: f.source == "guard" and not f.after_stop,
                 lambda f: f.rank is not None and not f.after_stop,
                 lambda f: f.rank is not None,
                 lambda f: True):
        for failure in failures:
            if pick(failure):
                return failure
    return None
