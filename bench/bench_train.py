"""Training benchmark: the trainer (deepy.py -> DeepSpeed runner -> ranks) against a bare
PyTorch loop of the identical model, data-parallel scaling, and memory under ZeRO 0-3.

    python bench/bench_train.py            # full run (about 35-40 minutes on 2 cores)
    python bench/bench_train.py --quick    # fewer cases, steps and repetitions (~6 minutes)
    python bench/bench_train.py --only 7M-fp32 --reps 5 --merge   # rerun one case into train.json

Writes ``bench/results/train.json`` (``--output``). What is measured:

* throughput cases (model x precision): the real trainer, ``python deepy.py train.py
  <config>`` on the preprocessed pydocs dataset (``data/pydocs``, built with ``python
  prepare_data.py pydocs`` when missing), and ``bench/bare_loop.py`` on the same config, run
  ALTERNATELY in one session (the order of the runs rotates by one every repetition); fp32
  cases also run, in the same rotation, the trainer on 2 data-parallel ranks (1 thread each)
  and on 1 rank with 1 thread (the per-core baseline of the scaling);
* steady-state step time: every run does ``interval`` warm-up steps, then ``intervals`` timed
  intervals of ``interval`` steps. For the trainer the samples are the ``step_time_s`` of its
  ``metrics.jsonl`` with ``log_interval = interval`` (the mean step time of the interval: data
  loading, forward, backward, step guard, optimizer, LR schedule, everything the loop does per
  iteration; the logging call itself falls between intervals), the first interval (start-up)
  dropped. The bare loop times the same intervals with ``perf_counter``;
* tokens/s = tokens per step / step time; TFLOP/s and MFU with the trainer's formula
  (``megatron.model_size.flops_per_token``, ``megatron.logging.mfu``) against the declared CPU
  peak (see :func:`machine.cpu_peak`); the trainer/bare ratio per adjacent pair and pooled;
* peak RSS per rank: ``VmHWM`` of every rank process, polled from ``/proc`` while it runs
  (the peak is reached in the first steps and only read more often than it changes); the bare
  loop reports ``ru_maxrss``;
* ZeRO stages 0-3 on 2 ranks (fp32): peak RSS per rank and step time (not interleaved).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from machine import cpu_peak, environment, measured_gemm_tflops

ROOT = Path(__file__).resolve().parents[1]

PY = sys.executable
DATA_PREFIX = "data/pydocs/pydocs_text_document"  # relative to the repository root (cwd)
TOKENIZER = "data/pydocs/tokenizer/tokenizer.json"
CONFIG_DIR = ROOT / "bench" / "results" / "configs"  # the exact configs of every run
RUN_DIR = "runs/bench"  # logs and index caches (git-ignored)


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    seq: int
    tied: bool


MODELS = {
    # 4 x 256, untied 8192-token vocabulary: 7.4M parameters
    "7M": ModelShape(layers=4, hidden=256, heads=4, seq=256, tied=False),
    # 8 x 512, tied embeddings: 29.4M parameters
    "30M": ModelShape(layers=8, hidden=512, heads=8, seq=512, tied=True),
}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    precision: str  # fp32 | bf16
    micro_batch: int
    interval: int  # steps per timed interval (= warm-up steps)
    intervals: int  # timed intervals per run
    reps: int  # trainer/bare pairs
    dp2: bool  # also the trainer on 2 data-parallel ranks (same micro batch per rank)


def full_cases() -> list[Case]:
    return [
        Case("7M-fp32", "7M", "fp32", 8, interval=5, intervals=3, reps=4, dp2=True),
        Case("30M-fp32", "30M", "fp32", 2, interval=3, intervals=3, reps=4, dp2=True),
        # bf16 GEMMs run in a slow non-vectorised path on CPUs without AVX512-BF16/AMX (see
        # the README): fewer tokens per step and fewer steps, or the run takes an hour.
        Case("7M-bf16", "7M", "bf16", 2, interval=1, intervals=2, reps=2, dp2=False),
        Case("30M-bf16", "30M", "bf16", 1, interval=1, intervals=2, reps=1, dp2=False),
    ]


def quick_cases() -> list[Case]:
    return [
        Case("7M-fp32", "7M", "fp32", 8, interval=2, intervals=2, reps=1, dp2=True),
        Case("30M-fp32", "30M", "fp32", 2, interval=1, intervals=2, reps=1, dp2=False),
        Case("7M-bf16", "7M", "bf16", 1, interval=1, intervals=1, reps=1, dp2=False),
    ]


# -------------------------------------------------------------------------------- configs
def ensure_data() -> None:
    if (ROOT / f"{DATA_PREFIX}.bin").is_file() and (ROOT / TOKENIZER).is_file():
        return
    print("building the pydocs corpus (python prepare_data.py pydocs)", flush=True)
    subprocess.run([PY, "prepare_data.py", "pydocs", "--quiet"], cwd=ROOT, check=True)


def config_values(case: Case, *, ranks: int, zero_stage: int, run: str, peak_tflops: float,
                  train_iters: int, interval: int) -> dict[str, Any]:
    m = MODELS[case.model]
    values: dict[str, Any] = {
        "num_gpus": ranks,
        "pipe_parallel_size": 0,
        "model_parallel_size": 1,
        "num_layers": m.layers,
        "hidden_size": m.hidden,
        "num_attention_heads": m.heads,
        "seq_length": m.seq,
        "max_position_embeddings": m.seq,
        "norm": "layernorm",
        "pos_emb": "rotary",
        "rotary_pct": 0.25,
        "activation": "gelu",
        "no_weight_tying": not m.tied,
        "make_vocab_size_divisible_by": 64,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 6.0e-5,
        "weight_decay": 0.1,
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": case.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_iters": train_iters,
        "lr_decay_style": "cosine",
        "warmup": 0.01,
        "do_valid": False,
        "do_test": False,
        "eval_interval": 1_000_000,
        "eval_iters": 1,
        "log_interval": interval,
        "steps_per_print": 1_000_000,
        "seed": 1234,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "num_workers": 0,
        "data_path": DATA_PREFIX,
        "split": "949,50,1",
        "tokenizer_type": "HFTokenizer",
        "vocab_file": TOKENIZER,
        "data_cache_dir": f"{RUN_DIR}/index_cache",
        "log_dir": f"{RUN_DIR}/{run}/logs",
        # per rank: each rank of a CPU run gets cores / ranks threads
        "peak_theoretical_tflops": peak_tflops / ranks,
    }
    if case.precision == "bf16":
        values["bf16"] = {"enabled": True}
    if zero_stage:
        values["zero_optimization"] = {"stage": zero_stage}
    return values


def model_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """Parameters and FLOPs/token of a config, resolved as the trainer resolves it."""
    from megatron.model_size import flops_per_token, parameter_count
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
    from megatron.runtime import tokenizer_from_config

    merged = merge_configs([("bench", values)])
    cfg = resolve_config(merged, RunFacts(world_size=values["num_gpus"], gpu=False,
                                          launching=False, purpose="train"))
    cfg = cfg.with_vocab_size(tokenizer_from_config(cfg).vocab_size)
    vocab = cfg.tokenizer.padded_vocab_size
    return {
        "parameters": parameter_count(cfg.model, vocab),
        "flops_per_token": flops_per_token(cfg.model, vocab),
        "padded_vocab": vocab,
    }


# ---------------------------------------------------------------------------------- runs
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def _rank_of(proc: psutil.Process) -> int | None:
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return None
    if not any(c.endswith("train.py") for c in cmd) or any("rank_guard" in c for c in cmd):
        return None  # megatron.launch.rank_guard is the rank's small supervising parent
    for i, c in enumerate(cmd):
        if c.startswith("--local_rank="):
            return int(c.split("=", 1)[1])
        if c == "--local_rank" and i + 1 < len(cmd):
            return int(cmd[i + 1])
    return None


def write_config(name: str, values: dict[str, Any]) -> Path:
    """``bench/results/configs/<name>.yml``: the exact config a run used (the README's commands
    point at these files)."""
    CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    path = CONFIG_DIR / f"{name}.yml"
    path.write_text("# written by bench/bench_train.py; run from the repository root\n"
                    + yaml.safe_dump(values, sort_keys=False))
    return path


def trainer_command(cfg_path: Path) -> list[str]:
    return ["python", "deepy.py", "train.py", str(cfg_path.relative_to(ROOT))]


def bare_command(cfg_path: Path, case: Case) -> list[str]:
    return ["python", "bench/bare_loop.py", str(cfg_path.relative_to(ROOT)), "--warmup",
            str(case.interval), "--interval", str(case.interval), "--intervals",
            str(case.intervals), "--output", f"{RUN_DIR}/{cfg_path.stem}-bare/result.json"]


def _cpu_seconds(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def run_trainer(cfg_path: Path, values: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``deepy.py train.py cfg``; step-time samples from metrics.jsonl, peak RSS per rank and
    the CPU the launcher processes (deepy.py, DeepSpeed's runner and launcher, rank guards)
    use while the ranks train."""
    log_dir = ROOT / values["log_dir"]
    run_dir = log_dir.parent
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to, never truncated
    run_dir.mkdir(parents=True)
    cmd = [PY, *trainer_command(cfg_path)[1:], "--master_port", str(free_port())]
    out_path = run_dir / "stdout.txt"
    metrics = log_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        parent = psutil.Process(proc.pid)
        peaks: dict[int, float] = {}
        ranks: dict[int, int] = {}
        others: dict[int, psutil.Process] = {parent.pid: parent}
        first_cpu: dict[int, float] = {}
        last_cpu: dict[int, float] = {}
        window: list[float] = []
        metrics_size = 0
        expected = int(values["num_gpus"])
        # Polling must not take CPU from the ranks: the process tree is scanned only until
        # every rank is found, then one small /proc file per rank is read once a second
        # (VmHWM only grows, and it is reached in the first steps).
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, 9)
                raise RuntimeError(f"trainer timed out after {timeout:.0f} s: {cmd}")
            children = []
            if len(ranks) < expected:
                try:
                    children = parent.children(recursive=True)
                except psutil.Error:
                    pass
            for child in children:
                # classified on every poll: a new process shows its parent's command line
                # until it execs
                if child.pid in ranks:
                    continue
                rank = _rank_of(child)
                if rank is not None:
                    ranks[child.pid] = rank
                    others.pop(child.pid, None)
                    first_cpu.pop(child.pid, None)
                    last_cpu.pop(child.pid, None)
                else:
                    others[child.pid] = child
            for pid, rank in ranks.items():
                hwm = _vm_hwm_mb(pid)
                if hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0.0), hwm)
            # launcher CPU between the first and the last logged interval (start-up and
            # shut-down excluded): sampled whenever metrics.jsonl grows
            size = metrics.stat().st_size if metrics.is_file() else 0
            if size > metrics_size:
                metrics_size = size
                now = time.perf_counter()
                for pid, other in others.items():
                    cpu = _cpu_seconds(other)
                    if cpu is not None:
                        first_cpu.setdefault(pid, cpu)
                        last_cpu[pid] = cpu
                window = [window[0] if window else now, now]
            try:
                proc.wait(timeout=0.25 if len(ranks) < expected else 1.0)
            except subprocess.TimeoutExpired:
                pass
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = out_path.read_text()[-3000:]
        raise RuntimeError(f"trainer failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("type") == "train"]
    interval = values["log_interval"]
    timed = [r for r in train if r["iteration"] > interval]
    launcher_cpu = None
    if len(window) == 2 and window[1] > window[0] + 1.0:
        used = sum(last_cpu[pid] - first_cpu[pid] for pid in last_cpu)
        launcher_cpu = 100.0 * used / (window[1] - window[0])
    return {
        "kind": "trainer",
        "ranks": values["num_gpus"],
        "step_time_samples_s": [r["step_time_s"] for r in timed],
        "losses_at": {str(r["iteration"]): r["lm_loss"] for r in train},
        "trainer_reported_mfu": [r.get("mfu") for r in timed],
        "peak_rss_mb_per_rank": [peaks[k] for k in sorted(peaks)],
        "launcher_cpu_percent_of_one_core": launcher_cpu,
        "wall_s": wall,
        "load_average": os.getloadavg()[0],
    }


def run_bare(cfg_path: Path, case: Case, timeout: float) -> dict[str, Any]:
    cmd = [PY, *bare_command(cfg_path, case)[1:]]
    out = ROOT / cmd[-1]
    if out.parent.exists():
        shutil.rmtree(out.parent)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bare loop failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rec = json.loads(out.read_text())
    rec["wall_s"] = time.perf_counter() - t0
    rec["load_average"] = os.getloadavg()[0]
    rec["peak_rss_mb_per_rank"] = [rec.pop("peak_rss_mb")]
    # losses of the bare loop at the trainer's logging iterations (mean over the interval)
    losses = rec.pop("losses")
    k = case.interval
    rec["losses_at"] = {str(i + k): statistics.fmean(losses[i:i + k])
                        for i in range(0, len(losses) - k + 1, k)}
    return rec


# ----------------------------------------------------------------------------- statistics
def summarize(samples: list[float], tokens_per_step: int, flops_per_token: float,
              peak: float) -> dict[str, Any]:
    from megatron.logging.mfu import achieved_tflops, mfu

    med = statistics.median(samples)
    tps = tokens_per_step / med
    tflops = achieved_tflops(tps, flops_per_token, 1)
    return {
        "step_time_median_s": med,
        "step_time_min_s": min(samples),
        "step_time_max_s": max(samples),
        "samples": len(samples),
        "tokens_per_s": tps,
        "tflops": tflops,
        "mfu": mfu(tps, flops_per_token, peak, 1),
    }


def max_loss_difference(a: dict[str, float], b: dict[str, float]) -> float | None:
    common = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    if not common:
        return None
    return max(abs(a[k] - b[k]) for k in common)


def _median_step(rec: dict[str, Any]) -> float:
    return statistics.median(rec["step_time_samples_s"])


def bench_case(case: Case, peak: dict[str, Any], timeout: float) -> dict[str, Any]:
    steps = case.interval * (1 + case.intervals)
    kinds = ["trainer", "bare"] + (["trainer_2ranks", "trainer_1thread"] if case.dp2 else [])
    names = {"trainer": f"{case.name}-1rank", "bare": f"{case.name}-1rank",
             "trainer_2ranks": f"{case.name}-2ranks",
             "trainer_1thread": f"{case.name}-1rank-1thread"}
    configs: dict[str, Path] = {}
    values_of: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        ranks = 2 if kind == "trainer_2ranks" else 1
        values = config_values(case, ranks=ranks, zero_stage=0, run=names[kind],
                               peak_tflops=peak["tflops"], train_iters=steps,
                               interval=case.interval)
        if kind == "trainer_1thread":  # the per-core baseline of the scaling
            values["num_cpu_threads_per_rank"] = 1
            values["peak_theoretical_tflops"] = peak["tflops"] / (os.cpu_count() or 1)
        values_of[kind] = values
        configs[kind] = write_config(names[kind], values)  # trainer and bare: the same file
    numbers = model_numbers(values_of["trainer"])
    tokens = case.micro_batch * MODELS[case.model].seq
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(case.reps):
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for kind in order:
            if kind == "bare":
                rec = run_bare(configs[kind], case, timeout)
            else:
                rec = run_trainer(configs[kind], values_of[kind], timeout)
            rec["rep"], rec["position"] = rep, order.index(kind)
            runs[kind].append(rec)
            launcher = rec.get("launcher_cpu_percent_of_one_core")
            print(f"  {case.name} rep {rep} {kind:15s} step {_median_step(rec):7.3f} s  samples "
                  f"{[round(s, 3) for s in rec['step_time_samples_s']]}  peak RSS "
                  f"{[round(m) for m in rec['peak_rss_mb_per_rank']]} MB  load "
                  f"{rec['load_average']:.2f}"
                  + (f"  launcher CPU {launcher:.1f}%" if launcher is not None else ""),
                  flush=True)
    out: dict[str, Any] = {
        "case": asdict(case),
        "model": asdict(MODELS[case.model]),
        **numbers,
        "tokens_per_step_per_rank": tokens,
        "commands": {
            "trainer": " ".join(trainer_command(configs["trainer"])),
            "bare": " ".join(bare_command(configs["bare"], case)),
            **({k: " ".join(trainer_command(configs[k]))
                for k in ("trainer_2ranks", "trainer_1thread")} if case.dp2 else {}),
        },
        "runs": runs,
    }
    pooled = {k: [s for r in runs[k] for s in r["step_time_samples_s"]] for k in kinds}
    out["trainer"] = summarize(pooled["trainer"], tokens, numbers["flops_per_token"],
                               peak["tflops"])
    out["bare"] = summarize(pooled["bare"], tokens, numbers["flops_per_token"], peak["tflops"])
    pairs = [_median_step(b) / _median_step(t) for t, b in zip(runs["trainer"], runs["bare"])]
    out["ratio"] = {
        "pooled": out["bare"]["step_time_median_s"] / out["trainer"]["step_time_median_s"],
        "pairs": pairs,
        "pairs_median": statistics.median(pairs),
    }
    out["peak_rss_mb"] = {
        "trainer": max(m for r in runs["trainer"] for m in r["peak_rss_mb_per_rank"]),
        "bare": max(m for r in runs["bare"] for m in r["peak_rss_mb_per_rank"]),
    }
    launcher = [r["launcher_cpu_percent_of_one_core"] for r in runs["trainer"]
                if r.get("launcher_cpu_percent_of_one_core") is not None]
    out["launcher_cpu_percent_of_one_core"] = statistics.median(launcher) if launcher else None
    out["max_loss_difference_trainer_vs_bare"] = max(
        (d for t, b in zip(runs["trainer"], runs["bare"])
         if (d := max_loss_difference(t["losses_at"], b["losses_at"])) is not None),
        default=None)
    if case.dp2:
        s2 = summarize(pooled["trainer_2ranks"], 2 * tokens, numbers["flops_per_token"],
                       peak["tflops"])
        s1t = summarize(pooled["trainer_1thread"], tokens, numbers["flops_per_token"],
                        peak["tflops"])
        out["trainer_2ranks"], out["trainer_1thread"] = s2, s1t
        # 2 ranks process twice the tokens per step: tokens/s ratio = 2 x t1 / t2
        out["dp_scaling"] = {
            # against the best 1-rank run (both cores as 2 threads): the same cores, so ~1x
            "speedup": s2["tokens_per_s"] / out["trainer"]["tokens_per_s"],
            "speedup_pairs": [2 * _median_step(t) / _median_step(t2) for t, t2 in
                              zip(runs["trainer"], runs["trainer_2ranks"])],
            # against 1 rank on 1 core (1 thread): ceiling 2x minus the all-reduce
            "speedup_vs_1thread": s2["tokens_per_s"] / s1t["tokens_per_s"],
            "efficiency_vs_1thread": s2["tokens_per_s"] / (2 * s1t["tokens_per_s"]),
            "efficiency_vs_1thread_pairs": [_median_step(t) / _median_step(t2) for t, t2 in
                                            zip(runs["trainer_1thread"],
                                                runs["trainer_2ranks"])],
            # 1 rank: 2 threads against 1 (how well one rank uses the second core)
            "threads_speedup_1rank": out["trainer"]["tokens_per_s"] / s1t["tokens_per_s"],
        }
        out["peak_rss_mb"]["trainer_2ranks_per_rank"] = [
            max(r["peak_rss_mb_per_rank"][i] for r in runs["trainer_2ranks"]) for i in range(2)]
    return out


def bench_zero(model: str, peak: dict[str, Any], timeout: float, steps: int) -> dict[str, Any]:
    case = Case(f"zero-{model}", model, "fp32", 2 if model == "30M" else 8, interval=1,
                intervals=steps - 1, reps=1, dp2=False)
    out: dict[str, Any] = {"model": model, "ranks": 2, "micro_batch": case.micro_batch,
                           "steps": steps, "stages": {}}
    for stage in (0, 1, 2, 3):
        name = f"zero{stage}-{model}-2ranks"
        values = config_values(case, ranks=2, zero_stage=stage, run=name,
                               peak_tflops=peak["tflops"], train_iters=steps, interval=1)
        cfg_path = write_config(name, values)
        rec = run_trainer(cfg_path, values, timeout)
        rec["step_time_median_s"] = _median_step(rec)
        rec["command"] = " ".join(trainer_command(cfg_path))
        out["stages"][str(stage)] = rec
        print(f"  ZeRO stage {stage} ({model}, 2 ranks): peak RSS per rank "
              f"{[round(m) for m in rec['peak_rss_mb_per_rank']]} MB, step "
              f"{rec['step_time_median_s']:.3f} s", flush=True)
    return out


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the cases (and the ZeRO table) that ``new`` measured replaced; the
    environment and total time are those of the latest run, the earlier ones kept in
    ``earlier_runs``."""
    merged = dict(old)
    merged["cases"] = {**old.get("cases", {}), **new["cases"]}
    if "zero" in new:
        merged["zero"] = new["zero"]
    earlier = list(old.get("earlier_runs", []))
    run = {k: old[k] for k in ("environment", "total_seconds", "quick") if k in old}
    # what the replaced cases measured then, so a rerun never hides an earlier result
    run["replaced"] = {name: {"ratio": case.get("ratio"), "dp_scaling": case.get("dp_scaling"),
                              "measured_at": case.get("measured_at")}
                       for name, case in old.get("cases", {}).items() if name in new["cases"]}
    earlier.append(run)
    merged["earlier_runs"] = earlier
    for key in ("environment", "measured_gemm_tflops", "cpu_peak", "total_seconds", "quick"):
        merged[key] = new[key]
    merged["quick"] = bool(old.get("quick")) or bool(new["quick"])
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer cases, steps and repetitions")
    p.add_argument("--only", nargs="*", default=None,
                   help="case names (7M-fp32 30M-fp32 7M-bf16 30M-bf16 zero) to run")
    p.add_argument("--reps", type=int, default=None, help="override the repetitions per case")
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "train.json"))
    p.add_argument("--merge", action="store_true",
                   help="replace only the cases run now in an existing --output file (each case "
                        "keeps the time and load of its own run)")
    args = p.parse_args(argv)

    ensure_data()
    peak = cpu_peak()
    env = environment()
    gemm = measured_gemm_tflops(os.cpu_count() or 1)
    print(f"CPU peak (declared): {peak['derivation']}; measured GEMM fp32 "
          f"{gemm['fp32'] * 1000:.1f} GFLOP/s, bf16 {gemm['bf16'] * 1000:.1f} GFLOP/s; load "
          f"{env['load_average_at_start']}", flush=True)
    cases = quick_cases() if args.quick else full_cases()
    if args.only is not None:
        cases = [c for c in cases if c.name in args.only]
    if args.reps is not None:
        cases = [Case(**{**asdict(c), "reps": args.reps}) for c in cases]
    results: dict[str, Any] = {
        "quick": args.quick,
        "environment": env,
        "cpu_peak": peak,
        "measured_gemm_tflops": gemm,
        "method": __doc__,
        "cases": {},
    }
    start = time.perf_counter()
    for case in cases:
        print(f"{case.name}: {case.reps} repetition(s), {case.interval} warm-up + "
              f"{case.intervals} x {case.interval} timed steps per run", flush=True)
        results["cases"][case.name] = c = bench_case(case, peak, args.timeout)
        c["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        print(f"  -> trainer/bare {c['ratio']['pooled']:.3f} (pairs "
              f"{[round(x, 3) for x in c['ratio']['pairs']]}), trainer "
              f"{c['trainer']['tokens_per_s']:.0f} tokens/s, bare "
              f"{c['bare']['tokens_per_s']:.0f} tokens/s", flush=True)
    if args.only is None or "zero" in args.only:
        model = "7M" if args.quick else "30M"
        print(f"ZeRO stages 0-3 on 2 ranks ({model}, fp32):", flush=True)
        results["zero"] = bench_zero(model, peak, args.timeout, steps=2 if args.quick else 3)
    results["total_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.output)
    if args.merge and out.is_file():
        results = merge_results(json.loads(out.read_text()), results)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"total {results['total_seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
