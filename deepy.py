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
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import megatron  # noqa: F401  (sets DS_ACCELERATOR before DeepSpeed is imported)
from megatron import accelerator
from megatron.launcher import plan_launch
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
        launcher_cfg = resolve_section(merged, "launcher")
        plan = plan_launch(
            launcher_cfg, args.user_script, ["--neox_config", merged.encode()], gpu=gpu,
            local_device_count=accelerator.device_count(), source=", ".join(merged.files),
        )
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
        print("launch command:")
        print(plan.command_line())
        return 0
    for line in cfg.warnings:
        print(f"deepy.py: warning: {line}", file=sys.stderr)
    env = dict(os.environ)
    env.update(plan.env)
    print("deepy.py: " + shlex.join(plan.argv[:8]) + " ...", file=sys.stderr, flush=True)
    return supervise(plan.argv, env, args.user_script)


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
            cmdline = child.cmdline()
            is_launcher = any(part.startswith("deepspeed.launcher") for part in cmdline)
            if not is_launcher and any(os.path.basename(p) == script for p in cmdline):
                found.append(child)
        except psutil.Error:
            continue
    return found


def supervise(argv: list[str], env: dict[str, str], user_script: str) -> int:
    """Run the launcher and pass its exit status on.

    SIGTERM/SIGINT sent to deepy.py go to the local ranks (which save a checkpoint at the next
    step boundary and exit 0), not to DeepSpeed's launcher, which would treat its own
    termination as a failure. Where no local rank is found (ranks on other nodes), the
    launcher gets the signal and forwards it as it does.
    """
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, frame: object) -> None:
        workers = _worker_processes(proc.pid, user_script)
        targets = workers or [proc]
        for target in targets:
            try:
                target.send_signal(signal.SIGTERM)
            except (ProcessLookupError, OSError):
                pass
            except Exception:  # psutil.NoSuchProcess and friends
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # pragma: no cover - handler above replaces the default
            continue


if __name__ == "__main__":
    sys.exit(main())
