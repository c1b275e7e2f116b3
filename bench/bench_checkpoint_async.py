"""Checkpoint benchmark, synchronous vs asynchronous saves: how long training is blocked per
save, how long the write takes, and the write throughput against the disk's own figure.

    python bench/bench_checkpoint_async.py            # the ~30M model (fp32 + AdamW: ~370 MB)
    python bench/bench_checkpoint_async.py --quick    # the ~7M model

One rank in this process, through the trainer's own objects (as ``bench_checkpoint.py``): two
real training steps so the optimizer state exists, then ``Trainer.save()`` ``--repeat`` times
with ``async_save`` off and on. *Blocked* is the time ``save()`` takes on the step loop (for
async: DeepSpeed building its state dicts and the copy to host memory); *write* is the time of
writing the files (CRC-32 while writing, fsync), the manifest and ``latest`` (for async: in the
background thread, measured by the job itself). Between async saves the benchmark waits for
the write, so each save is measured alone.

The disk figure is dd-style: ``--disk-mb`` MB of random bytes written in 8 MB blocks to the
same directory and fsync'd (``dd if=... of=... bs=8M conv=fsync``). Writes
``bench/results/checkpoint_async.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_train import MODELS, RUN_DIR, Case, config_values, ensure_data, free_port, write_config
from machine import cpu_peak

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's megatron, not another installed one


def disk_write_mb_per_s(directory: Path, megabytes: int) -> float:
    """Sequential write throughput of ``directory``'s disk, fsync included (dd-style)."""
    block = os.urandom(8 << 20)
    path = directory / "dd.bin"
    start = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(max(1, megabytes // 8)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return max(1, megabytes // 8) * 8 * (1 << 20) / 1e6 / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~7M model")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--disk-mb", type=int, default=512)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "checkpoint_async.json"))
    args = p.parse_args(argv)
    ensure_data()
    model = "7M" if args.quick else "30M"
    case = Case(f"checkpoint-async-{model}", model, "fp32", 8 if model == "7M" else 2,
                interval=1, intervals=1, reps=1, dp2=False)
    os.chdir(ROOT)
    name = f"checkpoint-async-{model}"
    work = ROOT / RUN_DIR / name
    if work.exists():
        shutil.rmtree(work)
    values = config_values(case, ranks=1, zero_stage=0, run=name,
                           peak_tflops=cpu_peak()["tflops"], train_iters=1000, interval=1000)
    values.update({"save": f"{RUN_DIR}/{name}/checkpoints", "keep_last_n_checkpoints": 1})
    cfg_path = write_config(name, values)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())

    from megatron.checkpoint.resume import Checkpointer
    from megatron.runtime import start
    from megatron.training.data_setup import build_datasets, loader, sample_budget
    from megatron.training.engine_setup import build_engine
    from megatron.training.loop import Trainer
    from megatron.training.metrics_setup import build_metrics

    rt = start([str(cfg_path)], purpose="train")
    budget = sample_budget(rt.cfg)
    rt = rt.with_cfg(rt.cfg.replace_section("training", train_iters=budget.train_iters))
    metrics = build_metrics(rt)
    engine = build_engine(rt)
    trainer = Trainer(rt, engine, budget, metrics)
    train_set, _, _ = build_datasets(rt.cfg, budget)
    batches = trainer._micro_batches(iter(loader(train_set, rt.cfg, rt.state, 0)))
    for _ in range(2):
        trainer.train_step(batches)
        trainer.progress.iteration += 1
    params = sum(p.numel() for p in engine.ds.module.parameters())

    results: dict[str, dict[str, list[float]]] = {}
    lines: list[str] = []
    metrics.info = lines.append  # the per-save lines carry the timings
    iteration = 100
    size = 0
    for mode in ("sync", "async"):
        trainer.checkpointer = Checkpointer(asynchronous=mode == "async")
        blocked, write, copy = [], [], []
        for _ in range(args.repeat):
            iteration += 1
            trainer.progress.iteration = iteration
            t0 = time.perf_counter()
            trainer.save()
            blocked.append(time.perf_counter() - t0)
            trainer.finish_saves()
            job_line = [ln for ln in lines if f"at iteration {iteration} " in ln][-1]
            write.append(float(job_line.split(" write ")[1].split(" s (")[0]
                               .removeprefix("in the background ")))
            if "copy to host memory" in job_line:
                copy.append(float(job_line.split("copy to host memory ")[1].split(" s)")[0]))
            size = int(float(job_line.rsplit(" s (", 1)[1].split(" MB")[0]) * 1e6)
        results[mode] = {"blocked_s": blocked, "write_s": write, "host_copy_s": copy}
    metrics.close()
    disk = disk_write_mb_per_s(work, args.disk_mb)
    shutil.rmtree(work, ignore_errors=True)

    summary = {mode: {"blocked_s_median": statistics.median(r["blocked_s"]),
                      "host_copy_s_median": statistics.median(r["host_copy_s"])
                      if r["host_copy_s"] else None,
                      "write_s_median": statistics.median(r["write_s"]),
                      "write_mb_per_s": size / 1e6 / statistics.median(r["write_s"])}
               for mode, r in results.items()}
    result = {
        "quick": args.quick, "model": model, "shape": MODELS[model].__dict__,
        "parameters": params, "precision": "fp32", "zero_stage": 0, "ranks": 1,
        "checkpoint_mb": size / 1e6, "runs": results, "summary": summary,
        "disk_dd_write_mb_per_s": disk, "disk_dd_mb": args.disk_mb,
        "load_average": list(os.getloadavg()),
        "command": f"python bench/bench_checkpoint_async.py{' --quick' if args.quick else ''}",
        "config": str(cfg_path.relative_to(ROOT)), "method": __doc__,
    }
    for mode, s in summary.items():
        copy_part = f" (host copy {s['host_copy_s_median']:.3f} s)" \
            if s["host_copy_s_median"] is not None else ""
        print(f"{mode:5s}: training blocked {s['blocked_s_median']:.3f} s per save{copy_part}, write "
              f"{s['write_s_median']:.2f} s ({s['write_mb_per_s']:.0f} MB/s) for "
              f"{size / 1e6:.0f} MB")
    print(f"disk (dd-style, {args.disk_mb} MB, fsync): {disk:.0f} MB/s")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
