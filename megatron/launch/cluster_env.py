"""Rank, world size and rendezvous address from a cluster's environment (Slurm or MPI).

With ``deepspeed_slurm`` (ranks started by ``srun``) or ``deepspeed_mpi`` (ranks started by
``mpirun``), no DeepSpeed launcher sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; these
functions derive them from the variables the cluster software sets. They are pure functions
of the environment mapping so they can be tested without a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: ``node[01-03,7],gpu1`` -> node01 node02 ..."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(\[([^\]]*)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(3)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + part)
    return [h for h in (h.strip(",") for h in hosts) if h]


def slurm_environment(env: Mapping[str, str], master_port: int) -> dict[str, str]:
    """torch.distributed variables for a task started by ``srun``."""
    try:
        rank, world, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env["SLURM_LOCALID"]
    except KeyError as exc:
        raise RuntimeError(f"deepspeed_slurm: {exc.args[0]} is not set (not inside srun?)") \
            from None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    hosts = expand_nodelist(nodelist)
    out = {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": local,
        "MASTER_ADDR": env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port),
    }
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if tasks_per_node:
        out["LOCAL_WORLD_SIZE"] = re.split(r"[(,]", tasks_per_node)[0]
    return out


_MPI_VARIABLES = (  # (rank, size, local rank) in OpenMPI, MPICH/Hydra, MVAPICH, Intel MPI
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
)


def launched_by_mpi(env: Mapping[str, str]) -> bool:
    """Whether an MPI launcher (mpirun/mpiexec/srun --mpi) started this process."""
    return any(rank_key in env for rank_key, _size, _local in _MPI_VARIABLES)


def _usable_mpi4py() -> Any:
    """``mpi4py.MPI`` (initializing MPI), or None when mpi4py is not installed or finds no MPI
    library (mpi4py 4 wheels load libmpi at import and raise RuntimeError without one)."""
    try:
        from mpi4py import MPI  # type: ignore[import-not-found]
    except Exception:  # ImportError, or RuntimeError: cannot load MPI library
        return None
    return MPI


def mpi_environment(env: Mapping[str, str], master_port: int) -> dict[str, str]:
    """torch.distributed variables for a rank started by ``mpirun``.

    Uses mpi4py when it is installed and loads an MPI library (rank, size, node-local rank,
    and rank 0's address broadcast as the rendezvous address); otherwise the MPI
    implementation's environment variables. ``MASTER_ADDR``/``MASTER_PORT`` from the
    environment win (deepy.py exports them to mpirun's ranks); without them and without
    mpi4py the address is 127.0.0.1, i.e. one node. A process that no MPI launcher started
    but that has ``RANK`` and ``WORLD_SIZE`` (DeepSpeed's own launcher) keeps them.
    """
    if not launched_by_mpi(env):
        if "RANK" in env and "WORLD_SIZE" in env:
            return {}
        raise RuntimeError("deepspeed_mpi: no MPI rank variables found (OMPI_COMM_WORLD_RANK, "
                           "PMI_RANK, ...): start the ranks with mpirun (launcher: openmpi)")
    MPI = _usable_mpi4py()  # noqa: N806
    if MPI is not None:
        import socket

        comm = MPI.COMM_WORLD
        hosts = comm.allgather(socket.gethostname())
        if len(set(hosts)) == 1:
            master = "127.0.0.1"
        else:
            master = comm.bcast(socket.gethostbyname(socket.gethostname())
                                if comm.Get_rank() == 0 else None, root=0)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        return {
            "RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()),
            "LOCAL_RANK": str(local.Get_rank()), "LOCAL_WORLD_SIZE": str(local.Get_size()),
            "MASTER_ADDR": env.get("MASTER_ADDR") or master,
            "MASTER_PORT": env.get("MASTER_PORT") or str(master_port),
        }
    for rank_key, size_key, local_key in _MPI_VARIABLES:
        if rank_key in env and size_key in env:
            out = {
                "RANK": env[rank_key], "WORLD_SIZE": env[size_key],
                "LOCAL_RANK": env.get(local_key, "0"),
                "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": env.get("MASTER_PORT") or str(master_port),
            }
            for local_size in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                               "MPI_LOCALNRANKS"):
                if local_size in env:
                    out["LOCAL_WORLD_SIZE"] = env[local_size]
                    break
            return out
    raise RuntimeError("deepspeed_mpi: MPI rank variables without a world size "
                       f"({', '.join(k for k, _s, _l in _MPI_VARIABLES if k in env)}) and "
                       "mpi4py is not usable")
