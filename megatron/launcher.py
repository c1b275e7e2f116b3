"""Planning a launch: which hosts and slots the job gets, and the DeepSpeed runner command.

deepy.py validates the config against the world size computed here, then runs the command.
Hostfile parsing and include/exclude filtering are DeepSpeed's own functions, so the plan is
exactly what DeepSpeed's runner will do.
"""

from __future__ import annotations

import collections
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.groups_deepspeed import LauncherArgs

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default location


@dataclass(frozen=True)
class LaunchPlan:
    resources: dict[str, list[int]]  # host -> local slot ids, in launch order
    hostfile: str | None  # the hostfile used, None for a local launch
    world_size: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def multi_node(self) -> bool:
        return self.hostfile is not None and len(self.resources) > 1

    def command_line(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


def _hostfile_pool(args: LauncherArgs, source: str) -> tuple[str | None, dict[str, int] | None]:
    path = args.hostfile or DEFAULT_HOSTFILE
    if not Path(path).is_file():
        if args.hostfile:
            raise ConfigError(f"{source}: hostfile: {path} not found")
        return None, None
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        pool = _parse_hostfile(Path(path).read_text().splitlines())
    except ValueError as exc:
        raise ConfigError(f"{path}: bad hostfile ({exc}); lines look like 'worker-0 slots=8'") \
            from None
    return path, dict(pool)


def plan_resources(
    args: LauncherArgs, *, gpu: bool, local_device_count: int, source: str = "<config>"
) -> tuple[str | None, dict[str, list[int]]]:
    """Hosts and slots of the job, as DeepSpeed's runner will pick them."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

    if (args.include or args.exclude) and (args.num_nodes > 0 or (args.num_gpus or 0) > 0):
        raise ConfigError(f"{source}: include/exclude cannot be combined with num_nodes/num_gpus")
    hostfile, pool = _hostfile_pool(args, source)
    if pool is None:
        if args.num_nodes > 1:
            raise ConfigError(f"{source}: num_nodes: {args.num_nodes} nodes need a hostfile "
                              f"listing them (none at {args.hostfile or DEFAULT_HOSTFILE})")
        slots = local_device_count if gpu else 1
        if gpu and slots == 0:
            raise ConfigError(f"{source}: no GPUs found on this machine")
        pool = {"localhost": max(slots, 1)}
    try:
        active = parse_inclusion_exclusion(collections.OrderedDict(pool), args.include or "",
                                           args.exclude or "")
    except ValueError as exc:
        key_name = "include" if args.include else "exclude"
        raise ConfigError(f"{source}: {key_name}: {exc}") from None
    num_gpus = args.num_gpus if args.num_gpus is not None else -1
    active = apply_num_nodes_and_gpus(active, args.num_nodes, num_gpus)
    if not active or not any(active.values()):
        raise ConfigError(f"{source}: include/exclude/num_nodes leave no ranks to launch")
    return hostfile, {host: list(slots) for host, slots in active.items()}


def runner_argv(
    args: LauncherArgs,
    hostfile: str | None,
    user_script: str,
    user_args: list[str],
    *,
    gpu: bool,
    extra_runner_args: list[str] | None = None,
) -> list[str]:
    """The DeepSpeed runner command line for these launcher settings."""
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        argv += ["--hostfile", hostfile]
    if args.include:
        argv += ["--include", args.include]
    if args.exclude:
        argv += ["--exclude", args.exclude]
    if args.num_nodes > 0:
        argv += ["--num_nodes", str(args.num_nodes)]
    if args.num_gpus is not None:
        argv += ["--num_gpus", str(args.num_gpus)]
    elif not gpu and hostfile is None and not (args.include or args.exclude):
        argv += ["--num_gpus", "1"]  # one CPU rank unless num_gpus asks for more
    argv += ["--master_port", str(args.master_port)]
    if args.master_addr:
        argv += ["--master_addr", args.master_addr]
    argv += ["--launcher", args.launcher]
    if args.force_multi:
        argv.append("--force_multi")
    if args.no_ssh_check:
        argv.append("--no_ssh_check")
    if args.detect_nvlink_pairs:
        argv.append("--detect_nvlink_pairs")
    if args.autotuning_run:
        argv += ["--autotuning", args.autotuning_run]
    launcher_args = []
    if args.launcher == "slurm":
        if args.comment:
            launcher_args.append(f"--comment={args.comment}")
        if args.account:
            launcher_args.append(f"--account={args.account}")
    if launcher_args:
        argv += ["--launcher_args", " ".join(launcher_args)]
    argv += list(extra_runner_args or [])
    return argv + [user_script] + list(user_args)


def plan_launch(
    args: LauncherArgs,
    user_script: str,
    user_args: list[str],
    *,
    gpu: bool,
    local_device_count: int,
    source: str = "<config>",
    extra_runner_args: list[str] | None = None,
) -> LaunchPlan:
    hostfile, resources = plan_resources(args, gpu=gpu, local_device_count=local_device_count,
                                         source=source)
    world = sum(len(slots) for slots in resources.values())
    argv = runner_argv(args, hostfile, user_script, user_args, gpu=gpu,
                       extra_runner_args=extra_runner_args)
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if gpu else "cpu")}
    return LaunchPlan(resources, hostfile, world, argv, env)


def backend_command(plan: LaunchPlan) -> list[str] | None:
    """The per-launcher command (pdsh / mpirun / srun ...) DeepSpeed's runner will execute for
    a multi-node plan, built by DeepSpeed's own runner classes; None for a local launch."""
    from deepspeed.launcher import multinode_runner as mnr
    from deepspeed.launcher.runner import encode_world_info, parse_args

    args = parse_args(plan.argv[4:])
    if not (args.force_multi or len(plan.resources) > 1) or args.no_ssh:
        return None
    if not args.master_addr:
        args.master_addr = next(iter(plan.resources))  # the runner asks that host over ssh
    pool = {host: len(slots) for host, slots in plan.resources.items()}
    world_info = encode_world_info(plan.resources)
    classes = {
        "openmpi": mnr.OpenMPIRunner, "mvapich": mnr.MVAPICHRunner, "slurm": mnr.SlurmRunner,
        "mpich": mnr.MPICHRunner, "impi": mnr.IMPIRunner,
    }  # fmt: skip
    if args.launcher == "pdsh":
        cmd, _kill, _env = mnr.PDSHRunner(args, world_info).get_cmd(dict(os.environ),
                                                                   plan.resources)
        return [part for part in cmd if part]
    runner = classes[args.launcher](args, world_info, pool)
    return list(runner.get_cmd(dict(os.environ), plan.resources))
