"""Training processes to kill -9: each is a real ``train()`` run (one rank, the trainer's own
loop and checkpoint code), forked from a server that has already imported torch, DeepSpeed
and the trainer, so a start costs a couple of seconds instead of a fresh interpreter."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any

_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx",
            "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.pipe.engine",
            "megatron.training.loop", "megatron.training.engine_setup",
            "megatron.training.metrics_setup", "megatron.training.data_setup",
            "tests.checkpoint.kill_harness"]


@functools.cache
def context() -> Any:
    """One fork server per test session."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(configs: list[str], log: str, port: int, root: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(root)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from megatron.runtime.startup import run_main
    from megatron.training.loop import train

    run_main(lambda: train(configs))


def start_training(configs: list[str], log: Path, root: Path) -> Any:
    proc = context().Process(target=_child, args=(configs, str(log), _free_port(), str(root)))
    proc.start()
    return proc


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The train records of ``metrics.jsonl``; a line torn by a kill is skipped."""
    path = run_dir / "logs" / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "train":
            out.append(record)
    return out
