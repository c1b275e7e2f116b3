"""Checkpoint benchmark: seconds and bytes of the trainer's save and load.

    python bench/bench_checkpoint.py            # the ~30M model (fp32, AdamW state included)
    python bench/bench_checkpoint.py --quick    # the ~7M model

One rank in this process, through the trainer's own objects: ``megatron.runtime.start``
on a config file (as ``python train.py config.yml`` does), ``build_engine``, ``Trainer``, two
real training steps on the pydocs dataset (so the optimizer state exists), then
``Trainer.save()`` (DeepSpeed's ``save_checkpoint``, RNG states, config files, manifest,
atomic ``latest``) ``--repeat`` times at new iterations, and ``Trainer.load()`` (manifest check,
DeepSpeed's ``load_checkpoint`` with optimizer state, RNG states) ``--repeat`` times.

Saves return when the files are written to the page cache (no fsync of the tensor files);
loads read the checkpoint just written, from the page cache. Writes
``bench/results/checkpoint.json``.
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

from bench_train import (
    MODELS,
    RUN_DIR,
    Case,
    config_values,
    ensure_data,
    free_port,
    write_config,
)
from machine import cpu_peak

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ~7M model")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "checkpoint.json"))
    args = p.parse_args(argv)
    ensure_data()
    model = "7M" if args.quick else "30M"
    case = Case(f"checkpoint-{model}", model, "fp32", 8 if model == "7M" else 2, interval=1,
                intervals=1, reps=1, dp2=False)

    os.chdir(ROOT)  # the config's paths are relative to the repository root
    name = f"checkpoint-{model}"
    work = ROOT / RUN_DIR / name
    if work.exists():
        shutil.rmtree(work)
    ckpt = work / "checkpoints"
    values = config_values(case, ranks=1, zero_stage=0, run=name,
                           peak_tflops=cpu_peak()["tflops"], train_iters=1000, interval=1000)
    values.update({"save": f"{RUN_DIR}/{name}/checkpoints",
                   "load": f"{RUN_DIR}/{name}/checkpoints"})
    cfg_path = write_config(name, values)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())

    import torch

    from megatron.runtime import start
    from megatron.training.data_setup import (
        build_datasets,
        loader,
        sample_budget,
    )
    from megatron.training.engine_setup import build_engine
    from megatron.training.loop import Trainer
    from megatron.training.metrics_setup import build_metrics

    rt = start([str(cfg_path)], purpose="train")
    cfg = rt.cfg
    budget = sample_budget(cfg)
    rt = rt.with_cfg(cfg.replace_section("training", train_iters=budget.train_iters))
    cfg = rt.cfg
    metrics = build_metrics(rt)
    engine = build_engine(rt)
    trainer = Trainer(rt, engine, budget, metrics)
    train_set, _, _ = build_datasets(cfg, budget)
    batches = trainer._micro_batches(iter(loader(train_set, cfg, rt.state, 0)))
    for _ in range(2):
        trainer.train_step(batches)
        trainer.progress.iteration += 1
    params = sum(p.numel() for p in engine.ds.module.parameters())

    save_s, load_s, sizes = [], [], []
    for i in range(args.repeat):
        trainer.progress.iteration = 100 + i
        t0 = time.perf_counter()
        trainer.save()
        save_s.append(time.perf_counter() - t0)
        sizes.append(tree_bytes(ckpt / f"global_step{100 + i}"))
    before = [t.detach().clone() for t in engine.ds.module.parameters()]
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        trainer.load()
        load_s.append(time.perf_counter() - t0)
    same = all(torch.equal(a, b) for a, b in zip(before, engine.ds.module.parameters()))
    last = ckpt / f"global_step{100 + args.repeat - 1}"
    files = sorted(str(f.relative_to(last)) for f in last.rglob("*") if f.is_file())
    metrics.close()
    shutil.rmtree(work, ignore_errors=True)  # a few hundred MB per checkpoint

    size = sizes[-1]
    result = {
        "quick": args.quick,
        "model": model,
        "shape": MODELS[model].__dict__,
        "parameters": params,
        "precision": "fp32",
        "zero_stage": 0,
        "ranks": 1,
        "bytes": size,
        "files": files,
        "save_seconds": save_s,
        "load_seconds": load_s,
        "save_seconds_median": statistics.median(save_s),
        "load_seconds_median": statistics.median(load_s),
        "save_mb_per_s": size / 1e6 / statistics.median(save_s),
        "load_mb_per_s": size / 1e6 / statistics.median(load_s),
        "loaded_weights_equal_saved": same,
        "load_average": list(os.getloadavg()),
        "command": f"python bench/bench_checkpoint.py{' --quick' if args.quick else ''}",
        "config": str(cfg_path.relative_to(ROOT)),
        "method": __doc__,
    }
    print(f"checkpoint {model} ({params / 1e6:.1f}M parameters): {size / 1e6:.0f} MB; save "
          f"{result['save_seconds_median']:.2f} s (runs {[round(s, 2) for s in save_s]}), load "
          f"{result['load_seconds_median']:.2f} s (runs {[round(s, 2) for s in load_s]})")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
