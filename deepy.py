#!/usr/bin/env python
"""Launch a training, generation or evaluation script from GPT-NeoX config files.

    python deepy.py train.py configs/125M.yml configs/local_setup.yml
    python deepy.py --dry-run train.py -d configs 125M local_setup
    python deepy.py train.py configs/tiny.yml --train_iters 20 --num_gpus 2

The configs are merged in order, validated for the world size the launch will have, and
handed to DeepSpeed's runner together with the user script. ``--dry-run`` prints the resolved
config and the exact launcher command and starts nothing. An invalid config exits with status 2
and a one-line error naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import megatron  # noqa: F401  (sets DS_ACCELERATOR before DeepSpeed is imported)
from megatron import accelerator
from megatron.launcher import first_failure, parse_failure, plan_launch, runner_exports
from megatron.neox_arguments import ConfigError, RunFacts, load_config_files, purpose_of
from megatron.neox_arguments.cli import (
    COMMAND_LINE,
    parse_key_overrides,
    split_configs_and_overrides,
)
from megatron.neox_arguments.resolve import resolve_config, resolve_section
from megatron.neox_arguments.summary import summary_lines

LAUNCHER_FLAGS = {  # deepy option -> config key
    "hostfile": "hostfile", "include": "include", "exclude": "exclude",
    "num_nodes": "num_nodes", "num_gpus": "num_gpus", "master_port": "master_port",
    "master_addr": "master_addr", "launcher": "launcher", "force_multi": "force_multi",
    "no_ssh_check": "no_ssh_check",
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepy.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                   help="validate, print the resolved config and the launch command, exit")
    p.add_argument("-d", "--conf_dir", help="directory the config names are relative to")
    p.add_argument("-H", "--hostfile", help="MPI-style hostfile")
    p.add_argument("-i", "--include", help="NODE_SPEC[@NODE_SPEC ...] to use")
    p.add_argument("-e", "--exclude", help="NODE_SPEC[@NODE_SPEC ...] to leave out")
    p.add_argument("--num_nodes", type=int)
    p.add_argument("--num_gpus", type=int, help="ranks per node (CPU processes on CPU)")
    p.add_argument("--master_port", type=int)
    p.add_argument("--master_addr")
    p.add_argument("--launcher", help="pdsh, openmpi, mvapich, slurm, mpich, impi")
    p.add_argument("--force_multi", action="store_true", default=None)
    p.add_argument("--no_ssh_check", action="store_true", default=None)
    p.add_argument("--no_ssh", action="store_true",
                   help="start only this node's ranks, without ssh (run deepy.py on every node "
                   "with the same hostfile and --node_rank; see docs/multinode.md)")
    p.add_argument("--node_rank", type=int,
                   help="with --no_ssh: this node's line in the hostfile, from 0 (default: "
                   "$NODE_RANK, else this host's name in the hostfile)")
    p.add_argument("--launcher_args",
                   help="extra arguments for pdsh / mpirun / srun, as one quoted string")
    p.add_argument("--no_rank_guard", action="store_true",
                   help="start the user script directly instead of under "
                   "tools/launch/rank_guard.py (which names a rank that dies)")
    p.add_argument("user_script", help="train.py, generate.py, eval.py or your own script")
    p.add_argument("configs", nargs=argparse.REMAINDER,
                   help="config files, then optional --key value overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rest = list(args.configs)
    dry_run = args.dry_run
    if "--dry-run" in rest or "--dry_run" in rest:
        dry_run = True
        rest = [t for t in rest if t not in ("--dry-run", "--dry_run")]
    try:
        if not Path(args.user_script).is_file():
            raise ConfigError(f"{args.user_script}: user script not found")
        names, override_tokens = split_configs_and_overrides(rest)
        merged = load_config_files(names, args.conf_dir)
        overrides = {key: getattr(args, flag) for flag, key in LAUNCHER_FLAGS.items()
                     if getattr(args, flag) is not None}
        overrides.update(parse_key_overrides(override_tokens))
        if overrides:
            merged = merged.with_values(overrides, COMMAND_LINE)
        gpu = accelerator.is_gpu()
        plan = _plan(merged, args, gpu)
        if plan.config_overrides:  # e.g. deepspeed_mpi for ranks started by mpirun
            merged = merged.with_values(plan.config_overrides, LAUNCHER_ORIGIN)
            first, plan = plan, _plan(merged, args, gpu)
            plan = dataclasses.replace(plan, notes=tuple(dict.fromkeys(first.notes + plan.notes)),
                                       config_overrides=first.config_overrides)
        facts = RunFacts(world_size=plan.world_size, gpu=gpu, launching=not dry_run,
                         purpose=purpose_of(args.user_script))
        cfg = resolve_config(merged, facts)
    except ConfigError as exc:
        print(f"deepy.py: error: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print("\n".join(summary_lines(cfg)))
        hosts = ", ".join(f"{h}:{len(s)}" for h, s in plan.resources.items())
        print(f"hosts: {hosts} ({plan.hostfile or 'local launch'})")
        for line in _launch_details(plan):
            print(line)
        print("launch command:")
        print(plan.command_line())
        return 0
    for line in cfg.warnings:
        print(f"deepy.py: warning: {line}", file=sys.stderr)
    for line in plan.notes:
        print(f"deepy.py: {line}", file=sys.stderr)
    if plan.node_rank is not None:
        host = list(plan.resources)[plan.node_rank]
        print(f"deepy.py: per-node launch without ssh: node {plan.node_rank} of "
              f"{len(plan.resources)} ({host}), rendezvous at {plan.master_addr}:"
              f"{resolve_section(merged, 'launcher').master_port}", file=sys.stderr)
    env = dict(os.environ)
    env.update(plan.env)
    print("deepy.py: " + shlex.join(plan.argv[:8]) + " ...", file=sys.stderr, flush=True)
    written = _write_files(plan.files)
    try:
        return supervise(plan.argv, env, args.user_script,
                         pdsh=plan.multi_node_exec and plan.launcher == "pdsh")
    finally:
        _remove_files(written)


LAUNCHER_ORIGIN = "<launcher>"
FAILURE_GRACE_S = 20.0  # after a rank failed: time the launcher gets to stop the job itself
KILL_AFTER_S = 15.0  # ... then SIGTERM, and this long after that SIGKILL


def _plan(merged, args: argparse.Namespace, gpu: bool):
    return plan_launch(
        resolve_section(merged, "launcher"), args.user_script,
        ["--neox_config", merged.encode()], gpu=gpu,
        local_device_count=accelerator.device_count(), source=", ".join(merged.files),
        no_ssh=args.no_ssh, node_rank=args.node_rank, launcher_args=args.launcher_args,
        rank_guard=not args.no_rank_guard,
    )


def _launch_details(plan) -> list[str]:
    lines = [f"note: {note}" for note in plan.notes]
    if plan.node_rank is not None:
        lines.append(f"per-node launch (no ssh): this is node {plan.node_rank} of "
                     f"{len(plan.resources)}, master {plan.master_addr}")
    if plan.multi_node_exec:
        lines.append(f"ranks started by: {plan.launcher}")
        exported = runner_exports(plan)
        lines.append("exported to the ranks: " + " ".join(sorted(exported)))
    for path, text in plan.files.items():
        if path == plan.hostfile:
            lines.append(f"generated at launch: hostfile {path}:")
            lines += ["  " + line for line in text.splitlines()]
        else:  # values stay out of the output (.deepspeed_env may hold credentials)
            lines.append(f"generated at launch: {path} ({len(text.splitlines())} variables)")
    return lines


def _write_files(files: dict[str, str]) -> list[Path]:
    written = []
    for name, text in files.items():
        path = Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


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
    return found


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
        failure = parse_failure(raw.decode("utf-8", "replace"))
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
              grace: float | None = None, kill_after: float | None = None) -> int:
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
    """
    grace = FAILURE_GRACE_S if grace is None else grace
    kill_after = KILL_AFTER_S if kill_after is None else kill_after
    _become_subreaper()
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    watch = _StderrWatch(proc.stderr)

    def forward(signum: int, frame: object) -> None:
        workers = _worker_processes(proc.pid, user_script)
        _signal_all(workers or [proc], signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _watch(proc, watch, pdsh, grace, kill_after)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    watch.join(timeout=2)
    leftovers = _stop_leftovers()
    watch.join(timeout=5)
    return _report(code, watch.failures, leftovers)


def _watch(proc: subprocess.Popen, watch: _StderrWatch, pdsh: bool, grace: float,
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
            if pdsh:
                _signal_all([proc], signal.SIGTERM)  # the runner pkills every node's launcher
            else:
                import psutil

                try:
                    backends = psutil.Process(proc.pid).children()
                except psutil.Error:
                    backends = []
                _signal_all(backends or [proc], signal.SIGTERM)
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


def _report(code: int, failures: list, leftovers: list[str]) -> int:
    if code < 0:
        code = 128 - code
    if leftovers:
        print(f"deepy.py: stopped {len(leftovers)} process(es) still running after the "
              f"launcher exited: {', '.join(leftovers)}", file=sys.stderr, flush=True)
    failed = first_failure(failures)
    if failed is not None:
        code = code or 1
        others = len({(f.rank, f.host) for f in failures}) - 1
        more = f"; {others} other report(s) of failed ranks/nodes above" if others > 0 else ""
        print(f"deepy.py: error: {failed.describe()}; the job stopped with exit status "
              f"{code}{more}", file=sys.stderr, flush=True)
    elif code != 0:
        print(f"deepy.py: error: the launcher exited with status {code}", file=sys.stderr,
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
