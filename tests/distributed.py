"""Run a test function on several gloo ranks in child processes.

``run_distributed(fn, world_size, *args, **kwargs)`` starts ``world_size`` processes, each of
which initializes ``torch.distributed`` (gloo, ``MASTER_ADDR=127.0.0.1``, a free port chosen
per call), calls ``fn(rank, world_size, *args, **kwargs)``, destroys the process group and
sends its (picklable) return value back. The values come back as a list ordered by rank.

* ``fn`` must live in an importable module (a test module is fine; ``__main__`` is not).
* Children are forked from one ``forkserver`` that has already imported torch (and the
  other modules in ``_WARM_MODULES``), so a call costs a fraction of a second instead of a
  fresh interpreter per rank. The server starts with the first call (a few seconds, once per
  test session).
* If a rank raises, the call raises :class:`RankFailed` carrying that rank's formatted
  traceback; the other ranks get a short grace period and are then killed.
* If the ranks have not all finished after ``timeout`` seconds, every child still running
  dumps its Python stacks (``faulthandler`` on ``SIGUSR1``), is killed, and the call raises
  :class:`DistributedTimeout` with the stacks in the message.
* Each child's stdout/stderr go to a per-rank log whose tail is included in failure
  messages.
* Ranks run with ``DS_ACCELERATOR=cpu``, one intra-op thread, ``GLOO_SOCKET_IFNAME=lo``
  (unless set) and the usual ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables. They exit on
  their own if the test process dies, and a rendezvous port lost to another process between
  choosing and binding it is retried once.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

# Children get this long after the first failure to report their own errors.
_GRACE_AFTER_FAILURE_S = 2.0
# How long a child may take to write its stack dump after SIGUSR1.
_STACK_DUMP_WAIT_S = 2.0
_LOG_TAIL_CHARS = 3000
# Imported once in the fork server (see ``_warm_imports``), so children start with them
# loaded. Each is slow to import and imported by typical tests anyway: the first
# ``torch.testing.assert_close`` imports ``torch.distributed.tensor``; torch optimizers
# import ``torch._dynamo``; ``deepspeed.initialize`` reaches ``torch._inductor``. Paid once
# per session instead of once per rank and call.
_WARM_MODULES = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.testing",
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "pytest",
    "deepspeed",
]
_FORKSERVER_FLAG = "RUN_DISTRIBUTED_FORKSERVER"


class DistributedError(RuntimeError):
    """A distributed test run failed."""


class RankFailed(DistributedError):
    """A rank raised an exception (or died); ``rank`` is the first one that failed."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class DistributedTimeout(DistributedError):
    """The ranks did not finish in time; the message holds every live child's stacks."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _warm_imports() -> None:
    """Import ``_WARM_MODULES`` in the fork server; a module that fails is just skipped."""
    import importlib

    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the children will import (and report) it themselves
            pass


def _ensure_forkserver(ctx: Any) -> None:
    """Start the fork server (once per process) with this module preloaded.

    ``DS_ACCELERATOR=cpu`` is set for the server's lifetime only (its environment is copied
    at start), so DeepSpeed imported there selects the CPU accelerator like the ranks do,
    while the calling process's environment is left as it was.
    """
    from multiprocessing import forkserver

    ctx.set_forkserver_preload([__name__])
    saved = {key: os.environ.get(key) for key in ("DS_ACCELERATOR", _FORKSERVER_FLAG)}
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ[_FORKSERVER_FLAG] = "1"
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _exit_with_parent(lifeline: Connection) -> None:
    """Exit as soon as the calling test process goes away (``lifeline`` reaches EOF when its
    only write end, held by that process, is closed), so a killed test session leaves no
    ranks behind. Parent-pid checks do not work here: ranks are children of the fork
    server, which they themselves keep alive."""
    import threading

    def watch() -> None:
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(70)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _child_main(
    rank: int,
    world_size: int,
    port: int,
    payload: bytes,
    sys_path: list[str],
    conn: Connection,
    lifeline: Connection,
    log_path: str,
    stack_path: str,
    pg_timeout_s: float,
) -> None:
    import faulthandler

    _exit_with_parent(lifeline)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    stack_file = open(stack_path, "w")  # stays open: faulthandler writes to it
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and any(
        name == "lo" for _, name in socket.if_nameindex()
    ):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)

    # The message is sent before the process group is destroyed: tearing down the group
    # makes peers fail with "connection reset", and the parent should see the root cause.
    # Failures carry their wall-clock time so the parent can tell which came first.
    import torch.distributed as dist

    try:
        import torch

        torch.set_num_threads(1)
        from megatron.runtime.distributed import prepare_deepspeed_comm

        prepare_deepspeed_comm()  # as train.py does before deepspeed.initialize
        fn, args, kwargs = pickle.loads(payload)
        dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        result = fn(rank, world_size, *args, **kwargs)
        message: tuple[str, Any, float] = ("ok", pickle.dumps(result), 0.0)
    except BaseException:  # everything is reported to the parent
        message = ("error", traceback.format_exc(), time.time())
    try:
        conn.send(message)
    except Exception:  # e.g. a result that cannot be sent
        conn.send(("error", traceback.format_exc(), time.time()))
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-_LOG_TAIL_CHARS:]


def _logs(tmp: Path, ranks: list[int]) -> str:
    parts = []
    for rank in ranks:
        tail = _tail(tmp / f"rank{rank}.log").strip()
        if tail:
            parts.append(f"--- rank {rank} output (tail) ---\n{tail}")
    return "\n".join(parts)


def _dump_stacks(procs: list[Any], ranks: list[int], tmp: Path) -> str:
    for rank in ranks:
        if procs[rank].is_alive() and procs[rank].pid is not None:
            try:
                os.kill(procs[rank].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _STACK_DUMP_WAIT_S
    stacks: dict[int, str] = {}
    while time.monotonic() < deadline and len(stacks) < len(ranks):
        for rank in ranks:
            text = _tail(tmp / f"rank{rank}.stacks")
            if "File " in text:
                stacks[rank] = text
        time.sleep(0.05)
    return "\n".join(
        f"--- rank {rank} stacks ---\n{stacks.get(rank, '(no stack dump received)').strip()}"
        for rank in ranks
    )


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float,
) -> list[Any]:
    ctx = multiprocessing.get_context("forkserver")
    _ensure_forkserver(ctx)
    payload = pickle.dumps((fn, args, kwargs))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as tmp_name:
        tmp = Path(tmp_name)
        procs = []
        conns: list[Connection] = []
        lifeline_r, lifeline_w = ctx.Pipe(duplex=False)

        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, float]] = {}
        failed_at: float | None = None
        pending = set(range(world_size))
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_child_main,
                    args=(
                        rank,
                        world_size,
                        port,
                        payload,
                        list(sys.path),
                        child_end,
                        lifeline_r,
                        str(tmp / f"rank{rank}.log"),
                        str(tmp / f"rank{rank}.stacks"),
                        timeout + 60.0,
                    ),
                    name=f"rank{rank}",
                    daemon=False,  # ranks may start processes of their own (data loader workers)
                )
                proc.start()
                child_end.close()
                procs.append(proc)
                conns.append(parent_end)
            lifeline_r.close()
            deadline = time.monotonic() + timeout
            while pending:
                now = time.monotonic()
                if now >= deadline:
                    break
                if failed_at is not None and now - failed_at >= _GRACE_AFTER_FAILURE_S:
                    break
                waitables: list[Any] = [conns[r] for r in pending]
                waitables += [procs[r].sentinel for r in pending]
                wait(waitables, timeout=min(0.5, max(deadline - now, 0.01)))
                for rank in sorted(pending):
                    received = None
                    if conns[rank].poll():
                        try:
                            received = conns[rank].recv()
                        except EOFError:
                            received = None
                    if received is None and procs[rank].is_alive():
                        continue
                    if received is None:
                        code = procs[rank].exitcode
                        text = f"rank {rank} exited with code {code} without a result"
                        # A rank that died silently is the likely root cause: its peers then
                        # fail with connection errors, possibly reported before its death
                        # is noticed here. Time 0 puts it first.
                        received = ("error", text, 0.0)
                    pending.discard(rank)
                    kind, value, when = received
                    if kind == "ok":
                        results[rank] = pickle.loads(value)
                    else:
                        errors[rank] = (value, when)
                        if failed_at is None:
                            failed_at = time.monotonic()

            stacks = ""
            if pending and not errors:
                stacks = _dump_stacks(procs, sorted(pending), tmp)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
            for proc in procs:
                proc.join(timeout=10)
            for conn in conns:
                conn.close()
            lifeline_r.close()
            lifeline_w.close()

        if errors:
            first = min(errors, key=lambda r: (errors[r][1], r))
            others = "".join(
                f"\n--- rank {r} also failed ---\n{errors[r][0].strip()}"
                for r in sorted(errors)
                if r != first
            )
            logs = _logs(tmp, list(range(world_size)))
            raise RankFailed(
                f"rank {first} of {world_size} failed in {_name(fn)}:\n"
                f"{errors[first][0].strip()}{others}\n{logs}".rstrip(),
                first,
            )
        if pending:
            raise DistributedTimeout(
                f"{_name(fn)} on {world_size} ranks did not finish within {timeout:g} s; "
                f"still running: ranks {sorted(pending)}\n{stacks}\n"
                f"{_logs(tmp, sorted(pending))}".rstrip()
            )
        return [results[rank] for rank in range(world_size)]


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the ranks' return values ordered by rank. Raises :class:`RankFailed` when a rank
    raises or dies and :class:`DistributedTimeout` when the ranks are not done in
    ``timeout`` seconds. A run whose rendezvous port was taken by someone else between
    choosing and binding it is retried once with a new port.
    """
    if not 1 <= world_size <= 8:
        raise ValueError(f"world_size must be between 1 and 8, got {world_size}")
    try:
        return _run_once(fn, world_size, args, kwargs, timeout)
    except RankFailed as err:
        if "address already in use" not in str(err).lower():
            raise
    return _run_once(fn, world_size, args, kwargs, timeout)


# In the fork server: warm up, and drop the flag so no process started later repeats it.
if os.environ.pop(_FORKSERVER_FLAG, None) == "1":
    _warm_imports()
