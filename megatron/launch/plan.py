"""Planning a launch: which hosts and slots the job gets, and the DeepSpeed runner command.

deepy.py validates the config against the world size computed here, then runs the command.
Hostfile parsing and include/exclude filtering are DeepSpeed's own functions, so the plan is
exactly what DeepSpeed's runner will do. On top of DeepSpeed's runner the plan adds what a
multi-node job needs to actually work (see docs/multinode.md):

* the environment the remote ranks need, written to a generated ``.deepspeed_env`` file
  (``DS_ENV_FILE``) together with the user's own ``~/.deepspeed_env`` / ``./.deepspeed_env``;
* ``deepspeed_mpi`` / ``deepspeed_slurm`` switched on when ranks are started by mpirun / srun,
  with ``MASTER_ADDR``/``MASTER_PORT`` exported to them;
* a hostfile generated from the Slurm allocation for ``launcher: slurm`` inside ``salloc`` or
  ``sbatch``; srun's ``--kill-on-bad-exit``; Open MPI's root and loopback settings;
* the ssh-less per-node launch (``no_ssh`` + ``node_rank``);
* the rank guard in front of the user script, run as ``python -m megatron.launch.rank_guard``
  from the installed package, which names a rank that dies (its lines are read by
  :mod:`megatron.launch.failures`);
* for a CPU job on this machine alone, the ``deepspeed.launcher.launch`` command the runner
  would start (:attr:`LaunchPlan.local_argv`): deepy.py starts it itself, saving the runner's
  process and its DeepSpeed import (seconds per launch).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import os
import re
import shlex
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.groups_deepspeed import LauncherArgs

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default location
RANK_GUARD = "megatron.launch.rank_guard"  # the module each rank runs under
MPI_LAUNCHERS = ("openmpi", "mvapich", "mpich", "impi")
# launchers whose ranks get no RANK/WORLD_SIZE from DeepSpeed and must discover them
DISCOVERY_KEYS = {"openmpi": "deepspeed_mpi", "mvapich": "deepspeed_mpi",
                  "slurm": "deepspeed_slurm"}
# Variables forwarded to remote ranks in addition to DeepSpeed's own list (PYTHON*, MLFLOW*,
# MV2*, UCX*, and NCCL* on GPUs): exact names, then prefixes. Secrets are never forwarded
# implicitly: on pdsh the values travel on the remote command line (visible in ps).
FORWARDED_NAMES = ("TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME",
                   "TP_SOCKET_IFNAME", "TORCH_DISTRIBUTED_DEBUG", "TORCH_CPP_LOG_LEVEL",
                   "HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE")
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_")
LOCAL_HOST_NAMES = ("localhost", "127.0.0.1", "::1", "localhost.localdomain")


@dataclass(frozen=True)
class LaunchPlan:
    resources: dict[str, list[int]]  # host -> local slot ids, in launch order
    hostfile: str | None  # the hostfile used, None for a local launch
    world_size: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for the runner on this machine
    launcher: str = "pdsh"
    multi_node_exec: bool = False  # the runner starts ranks through pdsh/mpirun/srun
    node_rank: int | None = None  # this node's index for a per-node (no_ssh) launch
    master_addr: str | None = None
    exports: dict[str, str] = field(default_factory=dict)  # forwarded to the remote ranks
    files: dict[str, str] = field(default_factory=dict)  # path -> text, written before launch
    config_overrides: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # the command DeepSpeed's runner would run for a local CPU launch (its launch.py), which
    # deepy.py runs in place of ``argv``; None where the runner has to decide
    local_argv: list[str] | None = None

    @property
    def multi_node(self) -> bool:
        return self.hostfile is not None and len(self.resources) > 1

    def command_line(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


# --------------------------------------------------------------------------- hosts and slots


def parse_hostfile_text(text: str, path: str) -> dict[str, int]:
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        return dict(_parse_hostfile(text.splitlines()))
    except ValueError as exc:
        raise ConfigError(f"{path}: bad hostfile ({exc}); lines look like 'worker-0 slots=8'") \
            from None


def _hostfile_pool(args: LauncherArgs, source: str,
                   generated: Mapping[str, str] | None = None
                   ) -> tuple[str | None, dict[str, int] | None]:
    path = args.hostfile or DEFAULT_HOSTFILE
    if generated and path in generated:
        return path, parse_hostfile_text(generated[path], path)
    if not Path(path).is_file():
        if args.hostfile:
            raise ConfigError(f"{source}: hostfile: {path} not found")
        return None, None
    return path, parse_hostfile_text(Path(path).read_text(), path)


def plan_resources(
    args: LauncherArgs, *, gpu: bool, local_device_count: int, source: str = "<config>",
    generated: Mapping[str, str] | None = None,
) -> tuple[str | None, dict[str, list[int]]]:
    """Hosts and slots of the job, as DeepSpeed's runner will pick them."""
    if (args.include or args.exclude) and (args.num_nodes > 0 or (args.num_gpus or 0) > 0):
        raise ConfigError(f"{source}: include/exclude cannot be combined with num_nodes/num_gpus")
    hostfile, pool = _hostfile_pool(args, source, generated)
    if pool is None:
        if args.num_nodes > 1:
            raise ConfigError(f"{source}: num_nodes: {args.num_nodes} nodes need a hostfile "
                              f"listing them (none at {args.hostfile or DEFAULT_HOSTFILE})")
        slots = local_device_count if gpu else 1
        if gpu and slots == 0:
            raise ConfigError(f"{source}: no GPUs found on this machine")
        pool = {"localhost": max(slots, 1)}
        if not (args.include or args.exclude):
            # one host, no filter: slots 0..n-1, where n is num_gpus when set (the runner's
            # result, without importing DeepSpeed for it)
            count = args.num_gpus if (args.num_gpus or 0) > 0 else pool["localhost"]
            return None, {"localhost": list(range(count))}
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_inclusion_exclusion

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


def is_local_host(name: str) -> bool:
    """Whether ``name`` is this machine by its spelling (no DNS lookups)."""
    if name in LOCAL_HOST_NAMES or name.startswith("127."):
        return True
    own = socket.gethostname()
    return name in (own, own.split(".")[0])


def _tasks_per_node(environ: Mapping[str, str]) -> int | None:
    for name in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = environ.get(name, "")
        match = re.match(r"\d+", value)
        if match:
            return int(match.group())
    return None


def slurm_allocation_hostfile(environ: Mapping[str, str], *, gpu: bool,
                              local_device_count: int) -> str:
    """A hostfile for the nodes of the current Slurm allocation (``salloc``/``sbatch``): one
    line per node, with the allocation's tasks per node as slots (GPUs per node on a GPU
    machine when the allocation does not say)."""
    from megatron.launch.cluster_env import expand_nodelist

    hosts = expand_nodelist(environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
                            or "")
    if not hosts:
        raise ConfigError("launcher: slurm: SLURM_JOB_NODELIST is empty; run inside salloc or "
                          "sbatch, or pass a hostfile")
    slots = _tasks_per_node(environ) or (local_device_count if gpu else 1) or 1
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def resolve_node_rank(node_rank: int | None, resources: Mapping[str, list[int]],
                      environ: Mapping[str, str], source: str) -> int:
    """This node's index in the hostfile for a per-node launch: ``--node_rank``, else
    ``NODE_RANK`` from the environment, else the position of this machine's host name."""
    hosts = list(resources)
    if node_rank is None and environ.get("NODE_RANK", "").isdigit():
        node_rank = int(environ["NODE_RANK"])
    if node_rank is None:
        names = {socket.gethostname(), socket.getfqdn()}
        names |= {n.split(".")[0] for n in names}
        matches = [i for i, h in enumerate(hosts) if h in names or h.split(".")[0] in names]
        if len(matches) == 1:
            node_rank = matches[0]
    if node_rank is None:
        raise ConfigError(f"{source}: no_ssh: pass --node_rank (0..{len(hosts) - 1}, this "
                          f"node's line in the hostfile) or set NODE_RANK; host name "
                          f"{socket.gethostname()!r} is not in the hostfile")
    if not 0 <= node_rank < len(hosts):
        raise ConfigError(f"{source}: node_rank: {node_rank} is not in 0..{len(hosts) - 1} "
                          f"(the hostfile lists {len(hosts)} nodes)")
    return node_rank


# --------------------------------------------------------------------------- environment


def user_env_files(environ: Mapping[str, str]) -> list[str]:
    """The ``.deepspeed_env`` files DeepSpeed's runner would read (home, then the current
    directory; ``DS_ENV_FILE`` renames them or, when absolute, names one file)."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    found: list[str] = []
    for directory in (environ.get("HOME") or os.path.expanduser("~"), "."):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.path.abspath(path) not in map(os.path.abspath, found):
            found.append(path)
    return found


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped (DeepSpeed's runner
    itself stops on them, which is why deepy.py rewrites the files it reads)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            out[key.strip()] = value.strip()
    return out


def forwarded_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables of this environment that deepy.py forwards to remote ranks on top of
    DeepSpeed's own list."""
    out = {}
    for key, value in environ.items():
        if "\n" in value:
            continue
        if key in FORWARDED_NAMES or key.startswith(FORWARDED_PREFIXES):
            out[key] = value
    return out


def runner_exports(plan: LaunchPlan, environ: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """What DeepSpeed's runner will export to the ranks of a multi-node launch: its prefixes
    (PYTHON*, ...; PYTHONPATH gets the current directory in front) and the env file."""
    from deepspeed.launcher.runner import EXPORT_ENVS

    environ = dict(os.environ if environ is None else environ)
    environ["PYTHONPATH"] = os.path.abspath(".") + (
        ":" + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    prefixes = list(EXPORT_ENVS) + (["NCCL"] if plan.env.get("DS_ACCELERATOR") == "cuda" else [])
    out = {k: v for k, v in environ.items() if any(k.startswith(p) for p in prefixes)}
    out.update(plan.exports)
    return out


# --------------------------------------------------------------------------- the runner argv


def runner_argv(
    args: LauncherArgs,
    hostfile: str | None,
    user_script: str,
    user_args: list[str],
    *,
    gpu: bool,
    extra_runner_args: list[str] | None = None,
    launcher_args: list[str] | None = None,
    master_addr: str | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    no_ssh_check: bool | None = None,
    force_multi: bool | None = None,
    rank_guard: str | None = None,
    srun: bool = False,
) -> list[str]:
    """The DeepSpeed runner command line for these launcher settings.

    ``rank_guard`` names a module that every rank runs under, with the user script and its
    arguments as its own arguments: ``--module`` makes DeepSpeed's local launcher, pdsh and the
    MPI launchers start ``python -u -m <module>``. DeepSpeed's srun command ignores
    ``--module``, so when ``srun`` starts the ranks the runner gets ``-- -m <module>`` instead:
    its user script is ``-m`` and srun runs ``python -u -m <module> ...`` all the same.
    """
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
    master_addr = master_addr or args.master_addr
    if master_addr:
        argv += ["--master_addr", master_addr]
    argv += ["--launcher", args.launcher]
    if args.force_multi if force_multi is None else force_multi:
        argv.append("--force_multi")
    if args.no_ssh_check if no_ssh_check is None else no_ssh_check:
        argv.append("--no_ssh_check")
    if no_ssh:
        argv += ["--no_ssh", "--node_rank", str(node_rank if node_rank is not None else 0)]
    parts = []
    if args.launcher == "slurm":
        if args.comment:
            parts.append(f"--comment={args.comment}")
        if args.account:
            parts.append(f"--account={args.account}")
    parts += list(launcher_args or [])
    if parts:
        argv += ["--launcher_args", " ".join(shlex.quote(p) for p in parts)]
    argv += list(extra_runner_args or [])
    if rank_guard and srun:
        argv += ["--", "-m", rank_guard]
    elif rank_guard:
        argv += ["--module", rank_guard]
    return argv + [user_script] + list(user_args)


def local_launch_argv(resources: Mapping[str, list[int]], master_port: int, user_script: str,
                      user_args: list[str], *, rank_guard: str | None = None) -> list[str]:
    """DeepSpeed's ``launch.py`` command line exactly as its runner builds it for a launch on
    this machine without a hostfile: the slots as base64 JSON (``--world_info``), master
    127.0.0.1, ``--module`` when the ranks run under a module, the runner's defaults for the
    per-rank logs and the log level.
    """
    world_info = base64.urlsafe_b64encode(json.dumps(dict(resources)).encode()).decode()
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
            f"--world_info={world_info}", "--master_addr=127.0.0.1",
            f"--master_port={master_port}"]
    if rank_guard:
        argv.append("--module")
    argv += ["--enable_each_rank_log=None", "--log_level=info"]  # the runner's defaults
    return argv + [rank_guard or user_script] + ([user_script] if rank_guard else []) \
        + list(user_args)


def _runs_locally_without_runner(args: LauncherArgs, hostfile: str | None, *, gpu: bool,
                                 multi_exec: bool, no_ssh: bool, accelerator: str,
                                 extra_runner_args: list[str] | None) -> bool:
    """Whether the runner would just start launch.py on this machine with slots computed here:
    CPU ranks (on GPUs the runner reads the visible devices itself), no hostfile, no filter,
    no autotuning, nothing passed to the runner beyond the plan's own options (which leaves
    the runner's own handling of, e.g., ``detect_nvlink_pairs`` to the runner)."""
    return (not gpu and accelerator == "cpu" and hostfile is None and not multi_exec
            and not no_ssh and not (args.include or args.exclude) and not args.autotuning_run
            and not args.detect_nvlink_pairs and not extra_runner_args)


def _scratch_dir() -> str:
    """A fresh path (not created) for the files a launch generates."""
    return os.path.join(tempfile.gettempdir(),
                        f"deepy-{os.getpid()}-{os.urandom(4).hex()}")


def plan_launch(
    args: LauncherArgs,
    user_script: str,
    user_args: list[str],
    *,
    gpu: bool,
    local_device_count: int,
    source: str = "<config>",
    extra_runner_args: list[str] | None = None,
    no_ssh: bool = False,
    node_rank: int | None = None,
    launcher_args: str | None = None,
    rank_guard: bool = False,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Plan the launch. The keyword arguments after ``extra_runner_args`` are deepy.py's
    command-line options: ``no_ssh``/``node_rank`` for a per-node launch without ssh,
    ``launcher_args`` passed to pdsh/mpirun/srun, ``rank_guard`` to run each rank under
    ``python -m megatron.launch.rank_guard``. ``environ`` defaults to ``os.environ``."""
    environ = os.environ if environ is None else environ
    notes: list[str] = []
    files: dict[str, str] = {}
    scratch = _scratch_dir()
    launcher = args.launcher
    force_multi = args.force_multi

    if (launcher == "slurm" and not args.hostfile and not Path(DEFAULT_HOSTFILE).is_file()
            and environ.get("SLURM_JOB_ID") and not no_ssh):
        path = os.path.join(scratch, "hostfile")
        files[path] = slurm_allocation_hostfile(environ, gpu=gpu,
                                                local_device_count=local_device_count)
        args = dataclasses.replace(args, hostfile=path)
        force_multi = True  # even one node goes through srun
        notes.append(f"hostfile generated from Slurm job {environ['SLURM_JOB_ID']}: "
                     + ", ".join(files[path].split("\n")[:-1]))

    hostfile, resources = plan_resources(args, gpu=gpu, local_device_count=local_device_count,
                                         source=source, generated=files)
    world = sum(len(slots) for slots in resources.values())
    if launcher != "slurm" and (args.comment or args.account):
        notes.append("comment/account: only srun takes them (launcher: slurm); unused here")
    if launcher != "pdsh" and hostfile is not None and not no_ssh and not force_multi:
        force_multi = True  # a launcher the user named starts the ranks, even on one node
        notes.append(f"launcher: {launcher} starts the ranks (named in the config)")
    multi_exec = (force_multi or len(resources) > 1) and not no_ssh
    hosts = list(resources)
    local_only = all(is_local_host(h) for h in hosts)
    master_addr = args.master_addr
    no_ssh_check = args.no_ssh_check
    extra_launcher_args = shlex.split(launcher_args or "")
    env = {"DS_ACCELERATOR": environ.get("DS_ACCELERATOR", "cuda" if gpu else "cpu")}
    exports: dict[str, str] = {}
    overrides: dict[str, Any] = {}

    if no_ssh:
        if hostfile is None:
            raise ConfigError(f"{source}: no_ssh: a per-node launch needs a hostfile listing "
                              f"every node (the same file on each node)")
        node_rank = resolve_node_rank(node_rank, resources, environ, source)
        if not master_addr:
            master_addr = "127.0.0.1" if local_only else hosts[0]
            notes.append(f"master_addr: {master_addr} (the first host of the hostfile)")
    elif node_rank is not None:
        raise ConfigError(f"{source}: node_rank: only meaningful with --no_ssh")
    elif multi_exec:
        uses_ssh = launcher == "pdsh" or (launcher in MPI_LAUNCHERS and not local_only)
        if launcher in MPI_LAUNCHERS and (args.include or args.exclude or args.num_nodes > 0
                                          or args.num_gpus is not None):
            raise ConfigError(
                f"{source}: launcher: {launcher} runs every slot of the hostfile; "
                f"include/exclude/num_nodes/num_gpus cannot be used with it (edit the hostfile)")
        if launcher == "slurm" and not gpu and args.num_gpus is not None:
            raise ConfigError(
                f"{source}: num_gpus: with launcher slurm this asks srun for GPUs "
                f"(--gpus-per-node); on CPU nodes set the ranks per node in the hostfile or the "
                f"allocation (--ntasks-per-node)")
        if not master_addr and (local_only or launcher != "pdsh"):
            # the runner would otherwise ask the first host over ssh ('hostname -I')
            master_addr = "127.0.0.1" if local_only else hosts[0]
            notes.append(f"master_addr: {master_addr} (the first host)")
        if not uses_ssh and not no_ssh_check:
            no_ssh_check = True
        key = DISCOVERY_KEYS.get(launcher)
        if key and not getattr(args, key):
            overrides[key] = True
            notes.append(f"{key}: true (ranks started by {launcher} discover their rank from "
                         f"its environment)")
        if launcher != "pdsh" and master_addr:  # pdsh ranks get them from DeepSpeed's launch
            exports["MASTER_ADDR"] = master_addr
            exports["MASTER_PORT"] = str(args.master_port)
        if launcher == "openmpi":
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
                    env[name] = environ.get(name, "1")
            mca = " ".join(extra_launcher_args)
            if local_only and "btl_tcp_if" not in mca:
                # DeepSpeed's default is '--mca btl_tcp_if_include eth0'
                extra_launcher_args += ["--mca", "btl_tcp_if_include", "lo"]
        if launcher == "slurm":
            env["SLURM_KILL_BAD_EXIT"] = environ.get("SLURM_KILL_BAD_EXIT", "1")
        exports.update(forwarded_environment(environ))
        for path in user_env_files(environ):
            exports.update(parse_env_file(Path(path).read_text()))
        env_file = os.path.join(scratch, "deepspeed_env")
        files[env_file] = "".join(f"{k}={v}\n" for k, v in exports.items())
        env["DS_ENV_FILE"] = env_file
    elif launcher != "pdsh":
        notes.append(f"launcher: {launcher} is not used: one node without a hostfile runs "
                     f"DeepSpeed's local launcher (--force_multi starts it through {launcher})")
    elif hostfile is not None and local_only:
        # DeepSpeed's runner would check ssh to this machine (and ask it for its address)
        # before it picks its local launcher for a one-node hostfile
        no_ssh_check = True
        master_addr = master_addr or "127.0.0.1"
    argv = runner_argv(args, hostfile, user_script, user_args, gpu=gpu,
                       extra_runner_args=extra_runner_args, launcher_args=extra_launcher_args,
                       master_addr=master_addr, no_ssh=no_ssh, node_rank=node_rank,
                       no_ssh_check=no_ssh_check, force_multi=force_multi,
                       rank_guard=RANK_GUARD if rank_guard else None,
                       srun=multi_exec and launcher == "slurm")
    local_argv = None
    if _runs_locally_without_runner(args, hostfile, gpu=gpu, multi_exec=multi_exec,
                                    no_ssh=no_ssh, accelerator=env["DS_ACCELERATOR"],
                                    extra_runner_args=extra_runner_args):
        local_argv = local_launch_argv(resources, args.master_port, user_script, user_args,
                                       rank_guard=RANK_GUARD if rank_guard else None)
    return LaunchPlan(resources, hostfile, world, argv, env, launcher=launcher,
                      multi_node_exec=multi_exec, node_rank=node_rank, master_addr=master_addr,
                      exports=exports, files=files, config_overrides=overrides,
                      notes=tuple(notes), local_argv=local_argv)


def backend_command(plan: LaunchPlan, environ: Mapping[str, str] | None = None
                    ) -> list[str] | None:
    """The per-launcher command (pdsh / mpirun / srun ...) DeepSpeed's runner will execute for
    a multi-node plan, built by DeepSpeed's own runner classes with the exports it will add;
    None for a local or per-node (no_ssh) launch."""
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
        "pdsh": mnr.PDSHRunner, "openmpi": mnr.OpenMPIRunner, "mvapich": mnr.MVAPICHRunner,
        "slurm": mnr.SlurmRunner, "mpich": mnr.MPICHRunner, "impi": mnr.IMPIRunner,
    }  # fmt: skip
    cls = classes[args.launcher]
    runner = cls(args, world_info) if cls is mnr.PDSHRunner else cls(args, world_info, pool)
    for key, value in runner_exports(plan, environ).items():
        runner.add_export(key, value)
    env = dict(os.environ if environ is None else environ)
    if args.launcher == "pdsh":
        cmd, _kill, _env = runner.get_cmd(env, plan.resources)
        return [part for part in cmd if part]
    return list(runner.get_cmd(env, plan.resources))
