"""Process start-up for the worker scripts: config, distributed init, parallel state, seeds.

``start(argv)`` is the first thing train.py / generate.py / eval.py call. It decodes the
config deepy.py passed, initializes ``torch.distributed`` through DeepSpeed with the
accelerator's backend (gloo on CPU ranks, NCCL on GPUs; MPI or Slurm discovery when asked),
builds the :class:`ParallelState` from the rank topology and seeds every RNG.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron import accelerator
from megatron.neox_arguments import ConfigError, NeoXConfig, RunFacts, purpose_of, resolve_config
from megatron.neox_arguments.cli import worker_merged_config
from megatron.parallel.random import RNGStatesTracker, model_parallel_seed
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology


@dataclass(frozen=True)
class Runtime:
    """What every worker knows after start-up."""

    cfg: NeoXConfig
    state: ParallelState
    tracker: RNGStatesTracker
    local_rank: int
    device: torch.device

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def is_logging_rank(self) -> bool:
        return self.state.rank == 0


def _discover_from_environment(cfg_values: dict[str, Any]) -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from MPI or Slurm when asked."""
    if cfg_values.get("deepspeed_slurm") and "SLURM_PROCID" in os.environ:
        from megatron.training.cluster_env import slurm_environment

        os.environ.update(slurm_environment(os.environ, cfg_values.get("master_port", 29500)))
    elif cfg_values.get("deepspeed_mpi"):
        from megatron.training.cluster_env import mpi_environment

        os.environ.update(mpi_environment(os.environ, cfg_values.get("master_port", 29500)))


def quiet_deepspeed() -> None:
    """DeepSpeed logs its set-up at INFO level on every rank; keep warnings and errors only
    (``DEEPSPEED_LOG_LEVEL=info`` brings the set-up messages back)."""
    import logging

    from deepspeed.utils import logger

    level = os.environ.get("DEEPSPEED_LOG_LEVEL", "warning").upper()
    logger.setLevel(getattr(logging, level, logging.WARNING))


def init_distributed(backend: str, timeout_minutes: int = 30) -> None:
    """Initialize torch.distributed (through DeepSpeed) unless it already is."""
    import deepspeed

    quiet_deepspeed()
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process started without a launcher
        os.environ["MASTER_PORT"] = str(_free_port()) \
            if os.environ.get("WORLD_SIZE", "1") == "1" else "29500"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_minutes))
    release_shm_workspace()


SHM_WORKSPACE = "deepspeed_allreduce_buffer"


def shm_workspace_path(env: dict[str, str] | None = None) -> Path:
    """The /dev/shm segment DeepSpeed's CPU shared-memory all-reduce creates for this rank."""
    env = dict(os.environ) if env is None else env
    name = (f"{SHM_WORKSPACE}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '')}")
    return Path("/dev/shm") / name


def release_shm_workspace() -> None:
    """Unlink this rank's shared-memory all-reduce segment once every rank has mapped it.

    On CPU, DeepSpeed maps a 66 MB segment per rank in /dev/shm when all ranks share a node and
    never unlinks it, so every run would leave ``world_size`` x 66 MB of RAM behind until the
    tmpfs fills. After the barrier every peer holds its mapping; unlinking only drops the name.
    """
    if torch.distributed.get_world_size() > 1:  # every rank passes here, segment or not
        torch.distributed.barrier()
    shm_workspace_path().unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_cpu_threads(cfg: NeoXConfig) -> None:
    """On CPU ranks, share the node's cores between its ranks instead of oversubscribing."""
    if accelerator.is_gpu():
        return
    threads = cfg.launcher.num_cpu_threads_per_rank
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // local_world_size())
    torch.set_num_threads(threads)


def local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun; set from MPI / Slurm by
    ``cluster_env``), ``LOCAL_SIZE`` (DeepSpeed's launcher), else the world size over the node
    count (``NNODES``, or DeepSpeed's ``CROSS_SIZE``)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = int(os.environ.get(name, "0") or 0)
        if value > 0:
            return value
    nodes = int(os.environ.get("NNODES", "") or os.environ.get("CROSS_SIZE", "") or 1)
    return max(1, int(os.environ.get("WORLD_SIZE", "1")) // max(1, nodes))


def seed_everything(seed: int, state: ParallelState) -> RNGStatesTracker:
    """Seed python, numpy and torch identically on all ranks; the tracker adds the
    model-parallel streams (dropout inside tensor-parallel regions differs per shard)."""
    random.seed(seed)
    np.random.seed(seed)
    accelerator.manual_seed_all(seed)
    return model_parallel_seed(seed, state)


def start(argv: list[str] | None = None, *, purpose: str | None = None) -> Runtime:
    """Decode the config, initialize distributed state and seeds for a worker process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    merged, local_rank = worker_merged_config(argv)
    _discover_from_environment(merged.values)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    purpose = purpose or purpose_of(sys.argv[0])
    cfg = resolve_config(merged, RunFacts(world_size=world, gpu=accelerator.is_gpu(),
                                          launching=True, purpose=purpose))
    local_rank = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", 0))
    os.environ["LOCAL_RANK"] = str(local_rank)
    accelerator.set_device(local_rank)
    set_cpu_threads(cfg)
    init_distributed(cfg.other.distributed_backend or accelerator.communication_backend())
    rank = torch.distributed.get_rank()
    topology = RankTopology(world, cfg.parallelism.model_parallel_size,
                            max(cfg.parallelism.pipe_parallel_size, 1))
    state = ParallelState.initialize(topology, rank,
                                     sequence_parallel=cfg.parallelism.sequence_parallel)
    tracker = seed_everything(cfg.training.seed, state)
    return Runtime(cfg=cfg, state=state, tracker=tracker, local_rank=local_rank,
                   device=accelerator.device(local_rank))


def run_main(main: Any) -> None:
    """Run a worker's main; configuration problems end with one line and status 2."""
    from megatron.checkpointing import CheckpointError
    from megatron.training.control import NonFiniteError

    try:
        code = main()
    except (ConfigError, CheckpointError) as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        code = 2
    except NonFiniteError as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        code = 3
    sys.exit(code or 0)
