"""Running the launcher and watching the job: deepy.py's process supervision.

:func:`supervise` starts the launch command of a plan (DeepSpeed's runner), copies its stderr
through while reading the failure lines of the rank guard, mpirun, srun and pdsh
(:mod:`megatron.launch.failures`), forwards SIGTERM/SIGINT to the local ranks, stops a job that
keeps running after a rank failed, stops processes left behind when the launcher exits, and
reports the rank to blame with the exit status.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from megatron.launch.failures import first_failure, parse_failure, parse_stop

FAILURE_GRACE_S = 20.0  # after a rank failed: time the launcher gets to stop the job itself
KILL_AFTER_S = 15.0  # ... then SIGTERM, and this long after that SIGKILL
STOP_WAIT_S = 600.0  # after a stop signal: time the ranks get to save once the launcher is gone
# "host:pid" of deepy.py, for the rank guards: a guard whose deepy.py is gone (kill -9) takes its
# rank down, as a signal to the whole process group used to
SUPERVISOR_ENV = "DEEPY_SUPERVISOR"


def _is_rank_cmdline(cmdline: list[str], script: str) -> bool:
    """``python [-options] <script> ...``: a rank, not its launcher (launch.py, mpirun, srun,
    pdsh) nor its rank guard, whose command lines also contain the script's name."""
    if not cmdline or not os.path.basename(cmdline[0]).startswith("python"):
        return False
    for part in cmdline[1:]:
        if part.startswith("-"):
            continue
        return os.path.basename(part) == script
    return False


def _worker_processes(launcher_pid: int, user_script: str) -> list:
    import psutil

    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    script = os.path.basename(user_script)
    found = []
    for child in children:
        try:
            if _is_rank_cmdline(child.cmdline(), script):
                found.append(child)
        except psutil.Error:
            continue
    # a rank's data-loader workers are forks with the rank's own command line: the rank, not
    # the launcher, stops them (after it has saved)
    pids = {p.pid for p in found}
    ranks = []
    for proc in found:
        try:
            if proc.ppid() not in pids:
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


def _become_subreaper() -> None:
    """Orphaned descendants (ranks whose launcher died) are re-parented to deepy.py instead of
    init, so the final sweep in supervise() finds them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def _signal_all(procs: list, sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)
        except Exception:  # gone already (psutil.NoSuchProcess, ProcessLookupError)
            pass


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


class _StderrWatch:
    """Copies the launcher's stderr to ours and collects the lines that report a failed rank
    (the rank guard's, mpirun's, srun's, pdsh's)."""

    def __init__(self, stream: Any) -> None:
        self.failures: list = []
        self.first_at: float | None = None
        self.stopped: str | None = None  # rank 0's stop line: the run saved and stopped
        self._fd = stream.fileno()
        self._thread = threading.Thread(target=self._run, name="deepy-stderr", daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        try:
            sys.stderr.flush()
            sys.stderr.buffer.write(data)
            sys.stderr.buffer.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if (stop := parse_stop(text)) is not None:
            self.stopped = stop
        failure = parse_failure(text)
        if failure is not None:
            self.failures.append(failure)
            if self.first_at is None:
                self.first_at = time.monotonic()

    def _run(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                break
            if not data:
                break
            self._write(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._line(raw)
            if len(pending) > 65536:
                pending = pending[-65536:]
        if pending:
            self._line(pending)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def supervise(argv: list[str], env: dict[str, str], user_script: str, *, pdsh: bool = False,
              local_launch: bool = False, grace: float | None = None,
              kill_after: float | None = None) -> int:
    """Run the launcher, watch the job, and pass its exit status on.

    SIGTERM/SIGINT sent to deepy.py go to the local ranks (which save a checkpoint at the next
    step boundary and exit 0), not to DeepSpeed's launcher, which would treat its own
    termination as a failure. Where no local rank is found (ranks on other nodes), the
    launcher gets the signal and forwards it as it does.

    When a rank fails (the rank guard's line, or mpirun's / srun's / pdsh's, on the launcher's
    stderr), the launchers normally stop the other ranks within seconds (gloo reports a dead
    peer at once). If the job is still running ``grace`` seconds later, deepy.py stops it:
    SIGTERM to DeepSpeed's runner for pdsh (which pkills the ranks on every node), to
    launch.py / mpirun / srun otherwise; ``kill_after`` seconds later SIGKILL to everything it
    started. Processes left behind when the launcher exits are stopped as well. The last line
    names the rank that failed first; the exit status is non-zero whenever a rank failed.

    ``local_launch``: ``argv`` is DeepSpeed's launch.py itself (the runner's local launch,
    started without the runner), so launch.py is the process that gets those SIGTERMs.
    """
    grace = FAILURE_GRACE_S if grace is None else grace
    kill_after = KILL_AFTER_S if kill_after is None else kill_after
    _become_subreaper()
    import socket

    env = {**env, SUPERVISOR_ENV: f"{socket.gethostname()}:{os.getpid()}"}
    # The job runs in a process group of its own: a signal to deepy.py's group (Ctrl-C in the
    # terminal, ``kill -TERM -PGID``, a batch system stopping the job's main process) reaches
    # deepy.py alone, which passes it on to the ranks once. Delivered to the launchers as well,
    # DeepSpeed's launch.py would kill the ranks 30 s later and its runner would die at once.
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, process_group=0)
    watch = _StderrWatch(proc.stderr)
    signalled: list[int] = []

    def forward(signum: int, frame: object) -> None:
        signalled.append(signum)
        workers = _worker_processes(proc.pid, user_script)
        if workers:  # the ranks treat SIGTERM and SIGINT alike
            _signal_all(workers, signum)
            return
        # DeepSpeed's runner stops the ranks on every node (pdsh); launch.py its local ranks
        _signal_all(_launchers(proc, pdsh or local_launch), signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _watch(proc, watch, pdsh or local_launch, grace, kill_after)
        watch.join(timeout=2)
        if signalled or watch.stopped:
            _wait_for_ranks(STOP_WAIT_S)  # launchers killed by the signal leave ranks saving
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    leftovers = _stop_leftovers()
    watch.join(timeout=5)
    return _report(code, watch.failures, leftovers, watch.stopped)


def _launchers(proc: subprocess.Popen, itself: bool) -> list:
    """The processes to stop a job through: ``proc`` itself, else its children (launch.py
    under DeepSpeed's runner; srun and mpirun, which pass SIGTERM on to their tasks), else
    ``proc`` when it has none."""
    if itself:
        return [proc]
    import psutil

    try:
        backends = psutil.Process(proc.pid).children()
    except psutil.Error:
        backends = []
    return backends or [proc]


def _wait_for_ranks(timeout: float) -> None:
    """After a stop signal, the launcher may be gone while ranks still save: wait for every
    process the job left (re-parented to deepy.py, a subreaper) to exit on its own."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in _descendants():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(p.pid, os.WNOHANG)
                else:
                    alive.append(p)
            except (psutil.Error, ChildProcessError, OSError):
                continue
        if not alive:
            return
        time.sleep(0.25)


def _watch(proc: subprocess.Popen, watch: _StderrWatch, stop_proc: bool, grace: float,
           kill_after: float) -> int:
    stage = 0
    while True:
        try:
            code = proc.wait(timeout=0.25)
            break
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:  # pragma: no cover - handler above replaces the default
            continue
        if watch.first_at is None:
            continue
        waited = time.monotonic() - watch.first_at
        if stage == 0 and waited > grace:
            stage = 1
            failed = first_failure(watch.failures)
            print(f"deepy.py: {failed.describe()} {waited:.0f} s ago and the job is still "
                  f"running: stopping it", file=sys.stderr, flush=True)
            # pdsh: the runner pkills every node's launcher
            _signal_all(_launchers(proc, stop_proc), signal.SIGTERM)
        elif stage == 1 and waited > grace + kill_after:
            stage = 2
            print("deepy.py: the job did not stop: killing it", file=sys.stderr, flush=True)
            _signal_all(_descendants(), signal.SIGKILL)
    return code


def _stop_leftovers() -> list[str]:
    import psutil

    left = []
    for proc in _descendants():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:  # an orphan that already exited: reap it
                os.waitpid(proc.pid, os.WNOHANG)
                continue
        except (psutil.Error, ChildProcessError, OSError):
            continue
        left.append(proc)
    if not left:
        return []
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} ({' '.join(p.cmdline()[:3])[:60]})")
        except psutil.Error:
            names.append(str(p.pid))
    _signal_all(left, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(left, timeout=5)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return names


def _report(code: int, failures: list, leftovers: list[str], stopped: str | None = None) -> int:
    if code < 0:
        code = 128 - code
    if leftovers:
        print(f"deepy.py: stopped {len(leftovers)} process(es) still running after the "
              f"launcher exited: {', '.join(leftovers)}", file=sys.stderr, flush=True)
    failed = first_failure(failures)
    if failed is None and stopped is not None:
        print(f"deepy.py: the job stopped on {stopped}",
              file=sys.stderr, flush=True)
        return 0
    if failed is not None:
        status = re.match(r"exited with status (\d+)$", failed.how)
        code = int(status.group(1)) if status else (code or 1)  # the blamed rank's own status
        others = len({(f.rank, f.host) for f in failures}) - 1
        more = f"; {others} other report(s) of failed ranks/nodes above" if others > 0 else ""
        print(f"deepy.py: error: {failed.describe()}; the job stopped with exit status "
              f"{code}{more}", file=sys.stderr, flush=True)
    elif code != 0:
        print(f"deepy.py: error: the launcher exited with status {code}", file=sys.stderr,
              flush=True)
    return code
