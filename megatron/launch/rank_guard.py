"""Run one rank of a job and report, on one line, how it ended when it did not end well.

deepy.py puts this module in front of the user script on every launch path (DeepSpeed's local
launcher, pdsh, mpirun, srun, the per-node launch without ssh), so each rank process is
started as

    python -u -m megatron.launch.rank_guard [--local_rank=N] train.py --neox_config ...

from the installed package, and runs ``python -u train.py [--local_rank=N] --neox_config ...``
as its child. When the child is killed by a signal or exits with a non-zero status, one line
goes to stderr:

    [rank-guard] rank 1 (pid 2268 on node-b) was killed by SIGKILL at 15:03:07
    [rank-guard] rank 0 (pid 2267 on node-a) exited with status 1 at 15:03:08 (after SIGTERM)

and the guard exits with the child's status (128 + N for signal N), so the launcher above sees
the failure as before. deepy.py reads these lines (megatron/launch/failures.py) to name the
rank that failed first.

The guard imports nothing but the standard library (it costs a few MB per rank; importing the
``megatron`` package on the way here loads nothing else while ``DS_ACCELERATOR`` is set, as the
launch sets it), forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1/SIGUSR2 to the rank, and makes the
kernel kill the rank if the guard itself is killed (PR_SET_PDEATHSIG), so a rank never outlives
its guard.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

PREFIX = "[rank-guard]"
# rank variables set by DeepSpeed's launcher, Open MPI, PMIx, MPICH/Hydra/Intel MPI, MVAPICH, srun
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK",
                  "MV2_COMM_WORLD_RANK", "SLURM_PROCID")
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
PR_SET_PDEATHSIG = 1
SUPERVISOR_ENV = "DEEPY_SUPERVISOR"  # "host:pid" of deepy.py (megatron.launch.supervise)


def rank_of(env: dict[str, str]) -> str:
    for name in RANK_VARIABLES:
        if env.get(name, "").isdigit():
            return env[name]
    return "?"


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the guard is already gone
            os._exit(137)
    except Exception:
        pass


def supervisor_pid(env: dict[str, str], host: str) -> int | None:
    """deepy.py's pid when it runs on this host (it starts the job in a process group of its
    own, so a kill -9 of its group no longer reaches the ranks: the guards watch it instead)."""
    where, _, pid = env.get(SUPERVISOR_ENV, "").rpartition(":")
    return int(pid) if where == host and pid.isdigit() else None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie is gone
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(options before the script, e.g. --local_rank=N from DeepSpeed's launcher; script; its
    arguments)."""
    before = []
    rest = list(argv)
    while rest and rest[0].startswith("--local_rank"):
        token = rest.pop(0)
        before.append(token)
        if "=" not in token and rest:
            before.append(rest.pop(0))
    if not rest:
        raise SystemExit("usage: python -m megatron.launch.rank_guard [--local_rank=N] SCRIPT "
                         "[ARGS ...]")
    return before, rest[0], rest[1:]


def main(argv: list[str]) -> int:
    before, script, args = split_argv(argv)
    cmd = [sys.executable, "-u", script, *before, *args]
    pending: list[int] = []
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if child is None:
            pending.append(signum)
            return
        try:
            child.send_signal(signum)
        except OSError:
            pass

    for name in FORWARDED:
        signal.signal(getattr(signal, name), forward)
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    for signum in pending:
        forward(signum, None)
    host = socket.gethostname()
    supervisor = supervisor_pid(dict(os.environ), host)
    while True:
        try:
            code = child.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            if supervisor is not None and not alive(supervisor):
                child.kill()
                received.append(signal.SIGKILL)
                print(f"{PREFIX} deepy.py (pid {supervisor}) is gone: stopping rank "
                      f"{rank_of(dict(os.environ))}", file=sys.stderr, flush=True)
                supervisor = None
    if received:  # the job is stopping: late copies of the signal must not kill the guard
        for name in FORWARDED:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if code == 0:
        return 0
    what = (f"was killed by {signal_name(-code)}" if code < 0
            else f"exited with status {code}")
    after = f" (after {signal_name(received[0])})" if received else ""
    line = (f"{PREFIX} rank {rank_of(dict(os.environ))} (pid {child.pid} on {host}) {what} "
            f"at {time.strftime('%H:%M:%S')}{after}")
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
