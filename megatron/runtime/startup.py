"""Process start-up for the worker scripts: config, distributed init, parallel state, seeds,
tokenizer.

``start(argv)`` is the first thing train.py / generate.py / eval.py call. It decodes the
config deepy.py passed, initializes ``torch.distributed`` through DeepSpeed with the
accelerator's backend (gloo on CPU ranks, NCCL on GPUs; MPI or Slurm discovery when asked),
builds the :class:`ParallelState` from the rank topology, seeds every RNG and loads the
tokenizer. The returned :class:`Runtime` holds the one resolved config of the process (with the
padded vocabulary of that tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron import accelerator
from megatron.neox_arguments import ConfigError, NeoXConfig, RunFacts, purpose_of, resolve_config
from megatron.neox_arguments.cli import worker_merged_config
from megatron.neox_arguments.groups_model import expert_parallel_size
from megatron.parallel.random import RNGStatesTracker, model_parallel_seed
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from megatron.runtime.distributed import (
    discover_from_environment,
    init_distributed,
    set_cpu_threads,
    shutdown_distributed,
)
from megatron.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Runtime:
    """What every worker knows after start-up."""

    cfg: NeoXConfig
    state: ParallelState
    tracker: RNGStatesTracker
    local_rank: int
    device: torch.device
    tokenizer: Any = None

    @property
    def rank(self) -> int:
        return self.state.rank

    @property
    def is_logging_rank(self) -> bool:
        return self.state.rank == 0

    def with_cfg(self, cfg: NeoXConfig) -> Runtime:
        """The same runtime with a config that a later start-up step completed (the training
        length that ``train_epochs`` decides)."""
        return dataclasses.replace(self, cfg=cfg)


def tokenizer_from_config(cfg: NeoXConfig) -> Any:
    """The tokenizer the config names; a missing file or unknown type is a ``ConfigError``."""
    tok = cfg.tokenizer
    try:
        return build_tokenizer(tok.tokenizer_type, vocab_file=tok.vocab_file,
                               merge_file=tok.merge_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer_type {tok.tokenizer_type}: {exc}") from None


def seed_everything(seed: int, state: ParallelState) -> RNGStatesTracker:
    """Seed python, numpy and torch identically on all ranks; the tracker adds the
    model-parallel streams (dropout inside tensor-parallel regions differs per shard)."""
    random.seed(seed)
    np.random.seed(seed)
    accelerator.manual_seed_all(seed)
    return model_parallel_seed(seed, state)


def start(argv: list[str] | None = None, *, purpose: str | None = None,
          tokenizer: bool = True) -> Runtime:
    """Decode the config, initialize distributed state and seeds for a worker process, and
    (``tokenizer``) load the tokenizer and size the vocabulary for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    merged, local_rank = worker_merged_config(argv)
    discover_from_environment(merged.values)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    purpose = purpose or purpose_of(sys.argv[0])
    cfg = resolve_config(merged, RunFacts(world_size=world, gpu=accelerator.is_gpu(),
                                          launching=True, purpose=purpose,
                                          user_script=sys.argv[0]))
    local_rank = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", 0))
    os.environ["LOCAL_RANK"] = str(local_rank)
    accelerator.set_device(local_rank)
    set_cpu_threads(cfg)
    init_distributed(cfg.other.distributed_backend or accelerator.communication_backend())
    rank = torch.distributed.get_rank()
    topology = RankTopology(world, cfg.parallelism.model_parallel_size,
                            max(cfg.parallelism.pipe_parallel_size, 1))
    state = ParallelState.initialize(topology, rank,
                                     sequence_parallel=cfg.parallelism.sequence_parallel,
                                     expert_parallel=expert_parallel_size(cfg.parallelism))
    tracker = seed_everything(cfg.training.seed, state)
    tok = None
    if tokenizer:
        tok = tokenizer_from_config(cfg)
        cfg = cfg.with_vocab_size(tok.vocab_size)
    return Runtime(cfg=cfg, state=state, tracker=tracker, local_rank=local_rank,
                   device=accelerator.device(local_rank), tokenizer=tok)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised by a data-loader worker (whose message
    carries the worker's traceback), the original error's own line."""
    text = str(exc)
    if "\n" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(exc).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


TEARDOWN_TIMEOUT_S = 5.0  # a failed rank's process-group teardown
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
              "Broken pipe", "Socket closed", "remote worker crashing")


def _peer_failure(exc: BaseException) -> bool:
    """A collective failed because a peer rank went away (gloo or NCCL)."""
    text = str(exc)
    return any(marker in text for marker in _PEER_GONE)


def run_main(main: Any) -> None:
    """Run a worker's main; configuration problems end with one line and status 2."""
    from megatron.checkpoint import CheckpointError
    from megatron.data.gpt2_dataset import DataError
    from megatron.training.control import NonFiniteError

    try:
        code = main()
    except (ConfigError, CheckpointError, DataError) as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {_one_line(exc)}", file=sys.stderr, flush=True)
        code = 2
    except NonFiniteError as exc:
        rank = os.environ.get("RANK", "0")
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        code = 3
    except RuntimeError as exc:
        if not _peer_failure(exc):
            raise
        # another rank stopped (its own error line is above): no traceback from this one
        rank = os.environ.get("RANK", "0")
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        print(f"error (rank {rank}): stopped because another rank failed ({first})",
              file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:  # generate/eval (train.py records SIGINT instead)
        rank = os.environ.get("RANK", "0")
        print(f"interrupted (rank {rank})", file=sys.stderr, flush=True)
        code = 130
    if code:
        # a failed rank tears its process group down without waiting for peers; if that blocks
        # (a peer stuck in a collective with this rank), it leaves without the interpreter's
        # exit path, where gloo's threads could abort the process
        import threading

        done = threading.Event()

        def teardown() -> None:
            shutdown_distributed(synchronize=False)
            done.set()

        threading.Thread(target=teardown, daemon=True).start()
        finished = done.wait(TEARDOWN_TIMEOUT_S)
        _stop_children()
        if not finished:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)
    shutdown_distributed(synchronize=True)
    _stop_children()
    sys.exit(0)


def _stop_children() -> None:
    """The rank's remaining data-loader workers are killed before it exits (see
    :func:`megatron.data.samplers.reap_loader_workers`)."""
    from megatron.data.samplers import reap_loader_workers

    reap_loader_workers()
