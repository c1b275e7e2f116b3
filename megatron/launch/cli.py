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
import sys
from pathlib import Path

from megatron import accelerator  # importing megatron sets DS_ACCELERATOR before DeepSpeed
from megatron.launch.plan import plan_launch, runner_exports
from megatron.launch.preflight import preflight
from megatron.launch.supervise import supervise
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
                   "python -m megatron.launch.rank_guard (which names a rank that dies)")
    p.add_argument("user_script", help="train.py, generate.py, eval.py or your own script")
    p.add_argument("configs", nargs=argparse.REMAINDER,
                   help="config files, then optional --key value overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the launch (the supervisor handles signals after it)
        print("deepy.py: interrupted before the launch; nothing was started", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
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
                         purpose=purpose_of(args.user_script), user_script=args.user_script)
        cfg = resolve_config(merged, facts)
        if not dry_run:
            plan = preflight(plan)
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
    argv = plan.local_argv or plan.argv  # launch.py, as the runner would start it locally
    print("deepy.py: " + shlex.join(argv[:8]) + " ...", file=sys.stderr, flush=True)
    written = _write_files(plan.files)
    try:
        return supervise(argv, env, args.user_script,
                         pdsh=plan.multi_node_exec and plan.launcher == "pdsh",
                         local_launch=plan.local_argv is not None)
    finally:
        _remove_files(written)


LAUNCHER_ORIGIN = "<launcher>"


def _plan(merged, args: argparse.Namespace, gpu: bool):
    return plan_launch(
        resolve_section(merged, "launcher"), args.user_script,
        ["--neox_config", merged.encode()], gpu=gpu,
        local_device_count=accelerator.device_count() if gpu else 0,
        source=", ".join(merged.files),
        no_ssh=args.no_ssh, node_rank=args.node_rank, launcher_args=args.launcher_args,
        rank_guard=not args.no_rank_guard,
    )


def _launch_details(plan) -> list[str]:
    lines = [f"note: {note}" for note in plan.notes]
    if plan.node_rank is not None:
        lines.append(f"per-node launch (no ssh): this is node {plan.node_rank} of "
                     f"{len(plan.resources)}, master {plan.master_addr}")
    if plan.local_argv:
        lines.append("local launch: deepy.py starts what the runner command below would: "
                     + shlex.join(plan.local_argv[:10]) + " ...")
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
