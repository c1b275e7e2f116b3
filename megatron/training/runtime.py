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
import time
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
    prepare_deepspeed_comm()  # before DeepSpeed builds its backend (here or in initialize)
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


# DeepSpeed's CPU shared-memory all-reduce; only its inference all-reduce uses it
SHM_COMM_OP = "deepspeed_shm_comm"
STALE_BUILD_LOCK_S = 600


def prepare_deepspeed_comm() -> None:
    """Keep DeepSpeed's communication set-up to what training uses.

    On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op at
    start-up (about 45 s the first time) and maps a 66 MB /dev/shm segment per rank that it
    never unlinks, so every run leaves ``world_size`` x 66 MB of RAM behind. The op serves only
    DeepSpeed's inference all-reduce; training collectives go through torch.distributed. Marking
    it incompatible (DeepSpeed keeps ``deepspeed.ops.__compatible_ops__`` as one dict for this)
    skips both. Also removes JIT-build locks left by a killed compile (see below).
    """
    clear_stale_build_locks()
    if accelerator.is_gpu():
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove torch JIT-build locks older than ``max_age_s``.

    A compile that is killed (Ctrl-C, out of memory) leaves ``<extensions dir>/<op>/lock``
    behind, and every later process waits on it forever without a word. A build here takes a
    few minutes at most, so an older lock belongs to no live build.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    removed = []
    now = time.time()
    for lock in [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"warning: removed a stale JIT-build lock {lock} (left by a killed "
                      f"compile)", file=sys.stderr, flush=True)
        except OSError:  # another rank removed it first
            continue
    return removed


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
    from megatron.checkpoint import CheckpointError
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
    shutdown_distributed(synchronize=not code)
    sys.exit(code or 0)


def shutdown_distributed(synchronize: bool) -> None:
    """Tear the process group down before the interpreter does.

    Left to interpreter exit, gloo's worker threads may release tensors after Python has
    finalized, and a rank whose run succeeded aborts with SIGABRT ("terminate called without an
    active exception"). After a successful run the ranks meet at a barrier first, so none tears
    down a connection that a peer is still using.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # exiting anyway; the launcher sees a failed peer on its own
        print(f"warning (rank {os.environ.get('RANK', '0')}): process group shutdown: {exc}",
              file=sys.stderr, flush=True)
