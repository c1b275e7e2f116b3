"""Running the real trainer (``deepy.py train.py ...``) on a small real-text corpus."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
from megatron.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def build_char_corpus(directory: Path, max_docs: int = 400) -> str:
    """Python's bundled help topics as a character-level dataset; returns the prefix."""
    from pydoc_data.topics import topics

    tok = build_tokenizer("CharLevelTokenizer")
    prefix = directory / "pydocs_char"
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin",
                                        dtype=best_fitting_dtype(tok.vocab_size))
    for name in sorted(topics)[:max_docs]:
        ids = tok.tokenize(topics[name]) + [tok.eod]
        builder.add_item(np.asarray(ids, dtype=np.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def write_config(path: Path, values: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def base_values(data_prefix: str, run_dir: Path, **extra: Any) -> dict[str, Any]:
    values = {
        "data_path": data_prefix, "split": "98,2,0", "tokenizer_type": "CharLevelTokenizer",
        "log_dir": str(run_dir / "logs"), "log_interval": 1, "eval_interval": 1000,
        "eval_iters": 1, "do_test": False, "num_workers": 0, "seq_length": 64,
        "max_position_embeddings": 64, "make_vocab_size_divisible_by": 8, "steps_per_print": 1000,
    }
    values.update(extra)
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepy_command(*configs: str, overrides: list[str] | None = None) -> list[str]:
    """A deepy.py train.py command line with its own rendezvous port (runs may overlap)."""
    port = ["--master_port", str(free_port())]
    return [sys.executable, "deepy.py", "train.py", *configs, *(overrides or []), *port]


def run_deepy(*configs: str, overrides: list[str] | None = None, timeout: int = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(deepy_command(*configs, overrides=overrides), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def start_deepy(*configs: str, overrides: list[str] | None = None,
                log: Path) -> subprocess.Popen:
    out = open(log, "w")  # noqa: SIM115 - closed by the caller through the process
    return subprocess.Popen(deepy_command(*configs, overrides=overrides), cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def records(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("type") == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records(run_dir)}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
