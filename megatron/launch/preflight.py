"""Checks made just before a launch starts anything: the launcher's tools are installed and the
hosts that will be reached over ssh answer.

DeepSpeed's runner makes the same checks, but reports a failure as a Python traceback. Each
check here raises :class:`ConfigError` with one line that says what to do; after a passed ssh
check the runner is told to skip its own (``--no_ssh_check``).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable

from megatron.launch.plan import MPI_LAUNCHERS, LaunchPlan, is_local_host
from megatron.neox_arguments.fields import ConfigError

# launcher -> the programs DeepSpeed's runner needs for it (its backend_exists checks, and
# the program it then runs)
BACKEND_TOOLS: dict[str, tuple[str, ...]] = {
    "pdsh": ("pdsh",),
    "openmpi": ("mpirun", "ompi_info"),
    "mvapich": ("mpirun", "mpiname"),
    "mpich": ("mpirun",),
    "impi": ("mpirun",),
    "slurm": ("srun", "sinfo"),
}
INSTALL_HINTS = {  # launcher -> where its tools come from
    "pdsh": "Debian: apt-get install pdsh",
    "openmpi": "Debian: apt-get install openmpi-bin",
    "mvapich": "MVAPICH2 from your cluster's modules",
    "mpich": "Debian: apt-get install mpich",
    "impi": "Intel MPI from your cluster's modules",
    "slurm": "Debian: apt-get install slurm-client; on a Slurm cluster, load its module",
}
SSH_TIMEOUT_S = 20


def missing_tools(launcher: str, which: Callable[[str], str | None] = shutil.which
                  ) -> list[str]:
    return [tool for tool in BACKEND_TOOLS.get(launcher, ()) if which(tool) is None]


def ssh_hosts(plan: LaunchPlan) -> list[str]:
    """The hosts DeepSpeed's runner would reach over ssh (its first host is checked)."""
    if not plan.multi_node_exec or plan.node_rank is not None:
        return []
    hosts = list(plan.resources)
    if plan.launcher == "pdsh" or (plan.launcher in MPI_LAUNCHERS
                                   and not all(is_local_host(h) for h in hosts)):
        return hosts
    return []


def ssh_reachable(host: str) -> str | None:
    """None when ``ssh host`` logs in without a password, else a short reason."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return "ssh is not installed here (Debian: apt-get install openssh-client)"
    try:
        out = subprocess.run(
            [ssh, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", host,
             "hostname"], capture_output=True, text=True, timeout=SSH_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        return f"no answer within {SSH_TIMEOUT_S + 10} s"
    if out.returncode == 0:
        return None
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exited with status {out.returncode}"


def preflight(plan: LaunchPlan, *, which: Callable[[str], str | None] = shutil.which,
              reach: Callable[[str], str | None] = ssh_reachable) -> LaunchPlan:
    """Check what the launch needs; returns the plan with the runner's own ssh check skipped
    when this one passed."""
    if plan.multi_node_exec:
        absent = missing_tools(plan.launcher, which)
        if absent:
            raise ConfigError(
                f"launcher: {plan.launcher} needs {' and '.join(absent)}, not found on PATH: "
                f"install it ({INSTALL_HINTS[plan.launcher]}) or pick another launcher")
    argv = plan.argv
    hosts = ssh_hosts(plan)
    if hosts and "--no_ssh_check" not in argv:
        first = hosts[0]
        problem = reach(first)
        if problem is not None:
            raise ConfigError(
                f"hostfile: {plan.hostfile}: host {first} is not reachable by passwordless "
                f"ssh ({problem}): set up ssh keys for it, start each node with --no_ssh "
                f"(docs/multinode.md), or remove the hostfile to train on this machine only")
        at = argv.index("--launcher")
        argv = argv[:at] + ["--no_ssh_check"] + argv[at:]
    return plan if argv is plan.argv else dataclasses.replace(plan, argv=argv)
