"""Where the start-up of ``python deepy.py train.py ...`` goes, phase by phase.

One launch of a tiny model for a few steps on CPU ranks, timed from outside: the processes of
the launch chain are seen as they start (their creation times), the ranks' output lines as they
arrive. Phases of one launch:

* ``deepy``: deepy.py's own start-up (imports, config merge and validation, the launch plan)
  until it starts the launcher;
* ``runner``: DeepSpeed's runner (when it runs) until it starts ``launch.py``;
* ``launch.py``: DeepSpeed's local launcher until it starts the rank guards;
* ``rank start-up``: the ranks' imports, rendezvous and config, until rank 0 prints its run
  header;
* ``first step``: model, engine and data built, first step done;
* ``steps``: the remaining steps;
* ``exit``: from the last step's line until deepy.py has exited.

Besides the launch, the whole-process time of ``deepy.py --dry-run`` and of importing the
ranks' heavy modules are measured. With ``--compare DIR`` the launches alternate between this
tree and another checkout (for before/after numbers on a shared, noisy machine).

    python bench/bench_launch.py                          # 3 launches of this tree
    python bench/bench_launch.py --compare /tmp/old-tree  # alternating with an older checkout
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's megatron, not another installed one
OUTPUT = ROOT / "bench" / "results" / "launch.json"
PHASES = ("deepy", "runner", "launch.py", "rank start-up", "first step", "steps", "exit",
          "total")
IMPORT_PROBES = {
    "torch": "import torch",
    "deepspeed (with torch)": "import megatron, deepspeed",
    "rank modules (train.py's imports)": "import megatron.runtime, megatron.training.loop",
}


def build_corpus(directory: Path) -> str:
    """Python's bundled help topics as a character-level dataset; returns the prefix."""
    from pydoc_data.topics import topics

    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("CharLevelTokenizer")
    prefix = directory / "pydocs_char"
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin",
                                        dtype=best_fitting_dtype(tok.vocab_size))
    for name in sorted(topics)[:200]:
        builder.add_item(np.asarray(tok.tokenize(topics[name]) + [tok.eod], dtype=np.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def write_config(directory: Path, prefix: str, ranks: int, steps: int) -> Path:
    import yaml

    values = {
        "data_path": prefix, "split": "98,2,0", "tokenizer_type": "CharLevelTokenizer",
        "log_dir": str(directory / "logs"), "log_interval": 1, "eval_interval": 100000,
        "eval_iters": 1, "num_workers": 0, "num_gpus": ranks, "train_iters": steps,
    }
    path = directory / "run.yml"
    path.write_text(yaml.safe_dump(values))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kind(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    if "deepspeed.launcher.runner" in text:
        return "runner"
    if "deepspeed.launcher.launch" in text:
        return "launch"
    if "megatron.launch.rank_guard" in text:
        return "guard"
    if len(cmdline) > 2 and cmdline[1:3] == ["-u", "train.py"]:
        return "rank"
    return None


def one_launch(tree: Path, config: Path, steps: int) -> dict[str, float]:
    """Phase durations (seconds) of one launch from ``tree``."""
    cmd = [sys.executable, "deepy.py", "train.py", "configs/tiny_neox.yml", str(config),
           "--master_port", str(free_port())]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # creation times count from the boot time, which the kernel gives in whole seconds: put
    # them on this clock through deepy.py's own creation time
    skew = psutil.Process(proc.pid).create_time() - started
    first: dict[str, float] = {}  # process kind -> earliest creation time (this clock)
    seen: set[int] = set()

    def watch() -> None:
        while proc.poll() is None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                if child.pid in seen:
                    continue
                try:
                    kind = _kind(child.cmdline())
                    created = child.create_time()
                except psutil.Error:
                    continue
                seen.add(child.pid)
                if kind and created - skew < first.get(kind, float("inf")):
                    first[kind] = created - skew
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    lines: dict[str, float] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        now = time.time()
        text = raw.decode("utf-8", "replace")
        tail = (tail + [text])[-40:]
        if text.startswith("==== run started") and "header" not in lines:
            lines["header"] = now
        elif text.startswith("iteration 1/"):
            lines["first"] = now
        elif text.startswith(f"iteration {steps}/{steps}"):
            lines["last"] = now
    code = proc.wait()
    ended = time.time()
    watcher.join(timeout=5)
    if code != 0 or len(lines) < 3:
        raise SystemExit(f"launch from {tree} failed (exit {code}):\n{''.join(tail)}")
    launcher = first.get("runner", first.get("launch"))
    guard = first.get("guard", first.get("rank"))
    rank = first.get("rank", guard)
    out = {
        "deepy": launcher - started,
        "runner": first["launch"] - first["runner"] if "runner" in first else 0.0,
        "launch.py": guard - first["launch"],
        "rank start-up": lines["header"] - rank,
        "first step": lines["first"] - lines["header"],
        "steps": lines["last"] - lines["first"],
        "exit": ended - lines["last"],
        "total": ended - started,
    }
    return {k: round(v, 3) for k, v in out.items()}


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.time()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.time() - started, 3)


def dry_run_seconds(tree: Path, config: Path) -> float:
    return timed([sys.executable, "deepy.py", "--dry-run", "train.py", "configs/tiny_neox.yml",
                  str(config)], tree)


def median_table(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {phase: {"median": round(statistics.median(r[phase] for r in runs), 2),
                    "min": round(min(r[phase] for r in runs), 2),
                    "max": round(max(r[phase] for r in runs), 2)} for phase in PHASES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="launches per tree")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compare", type=Path, help="another checkout, launched alternately")
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)
    trees = {"this tree": ROOT}
    if args.compare:
        trees["compared tree"] = args.compare.resolve()
    load_start = os.getloadavg()
    results: dict[str, Any] = {name: {"tree": str(tree), "launches": [], "dry_run_s": []}
                               for name, tree in trees.items()}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config = write_config(directory, build_corpus(directory), args.ranks, args.steps)
        for i in range(args.repeat):
            order = list(trees.items()) if i % 2 == 0 else list(reversed(trees.items()))
            for name, tree in order:
                phases = one_launch(tree, config, args.steps)
                results[name]["launches"].append(phases)
                results[name]["dry_run_s"].append(dry_run_seconds(tree, config))
                print(f"{name} #{i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
                      flush=True)
    imports = {label: timed([sys.executable, "-c", code], ROOT)
               for label, code in IMPORT_PROBES.items()}
    for entry in results.values():
        entry["phases"] = median_table(entry["launches"])
        entry["dry_run_median_s"] = round(statistics.median(entry["dry_run_s"]), 2)
    report = {"ranks": args.ranks, "steps": args.steps, "repeat": args.repeat,
              "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "import_s (whole process, this tree)": imports, "trees": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    names = list(results)
    print(f"\nmedian seconds over {args.repeat} launch(es), {args.ranks} ranks, {args.steps} "
          f"steps; load average {report['load_average_start']} -> "
          f"{report['load_average_end']}")
    print(f"{'phase':<16}" + "".join(f"{n:>24}" for n in names))
    for phase in PHASES:
        cells = [results[n]["phases"][phase] for n in names]
        print(f"{phase:<16}" + "".join(
            f"{c['median']:>12.2f} ({c['min']:4.1f}-{c['max']:4.1f})" for c in cells))
    print(f"{'dry run':<16}" + "".join(f"{results[n]['dry_run_median_s']:>12.2f}" + " " * 12
                                        for n in names))
    for label, seconds in imports.items():
        print(f"import {label}: {seconds:.2f} s (whole process)")
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
