"""Where the trainer's step time goes, against the bare loop, in one process.

    python bench/step_profile.py                 # the 7M and 30M fp32 models
    python bench/step_profile.py --quick         # the 7M model, fewer repetitions

For each model this builds the trainer exactly as ``train.py`` does (``runtime.start`` on the
benchmark's config file, ``build_engine``, ``Trainer``, the real data loader) and, beside it,
the bare loop of ``bench/bare_loop.py`` on the same config, then measures

1. the per-step pieces the trainer adds around forward/backward, each timed on its own on
   real gradients (best and median of ``--repeat`` calls): the pieces of the earlier trainer
   (DeepSpeed's gradient all-reduce over a single replica, DeepSpeed's fp32
   ``clip_grad_norm_``, the step guard's separate norm pass, the separate global norm on log
   steps) and what replaces them now (one fused norm pass shared by guard, clipping and log;
   the clipping multiply, only when the coefficient is below 1); the bare loop's
   ``torch.nn.utils.clip_grad_norm_`` for reference;
2. ``Trainer.train_step`` (plus the loop's per-iteration work) against the bare step,
   alternating every ``--steps`` steps for ``--pairs`` pairs: wall time and process CPU time;
3. one step of each under ``torch.profiler``: the operators whose call counts differ.

Writes ``bench/results/step_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench_train import (
    Case,
    config_values,
    ensure_data,
    free_port,
    write_config,
)
from machine import cpu_peak

ROOT = Path(__file__).resolve().parents[1]


def timeit(fn: Any, repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times)}


def op_counts(fn: Any) -> tuple[Counter, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    total = 0.0
    for evt in prof.key_averages():
        if evt.key.startswith("aten::") or evt.key.startswith("c10d::"):
            counts[evt.key] += evt.count
            total += evt.self_cpu_time_total
    return counts, total / 1000.0


def profile_model(model: str, pairs: int, steps: int, repeat: int) -> dict[str, Any]:
    import bare_loop
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip_grad_norm_

    from megatron.model import GPTModel
    from megatron.parallel import ParallelState
    from megatron.runtime import start
    from megatron.training.control import _grads_finite
    from megatron.training.data_setup import (
        build_datasets,
        loader,
        sample_budget,
    )
    from megatron.training.engine_setup import build_engine
    from megatron.training.grad_norm import check_grads, global_grad_norm
    from megatron.training.loop import Trainer
    from megatron.training.metrics_setup import build_metrics

    case = Case(f"profile-{model}", model, "fp32", 8 if model == "7M" else 2, interval=1000,
                intervals=1, reps=1, dp2=False)
    name = f"profile-{model}"
    values = config_values(case, ranks=1, zero_stage=0, run=name,
                           peak_tflops=cpu_peak()["tflops"], train_iters=10_000, interval=1000)
    cfg_path = write_config(name, values)
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

    data = bare_loop.batches(cfg, rt.tokenizer, 64)
    torch.manual_seed(cfg.training.seed)
    bare_model = GPTModel(cfg.model, cfg.act_ckpt,
                          padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                          state=ParallelState.single(), init_seed=cfg.training.seed)
    bare_model.train()
    bare = bare_loop.BareStep(cfg, bare_model, bf16=False)
    counter = {"bare": 0}

    def trainer_step() -> None:  # the loop body of Trainer.train, without logging
        trainer.stop.should_stop()
        _, skipped = trainer.train_step(batches)
        trainer.progress.iteration += 1
        if not skipped:
            engine.scheduler.step()

    def bare_step() -> None:
        bare(data[counter["bare"] % len(data)])
        counter["bare"] += 1

    for _ in range(2):
        trainer_step()
        bare_step()

    # 1. the pieces, on real gradients of one more forward/backward
    ds = engine.ds
    loss = engine.forward_loss(next(batches))
    ds.backward(loss)
    params = [p for p in ds.module.parameters() if p.requires_grad]
    grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in params) / 1e6
    pieces = {
        "before: DeepSpeed all-reduce of one replica (flatten, scale, reduce, copy back)":
            timeit(lambda: ds.allreduce_gradients(), repeat),
        "before: DeepSpeed fp32 clip_grad_norm_ (per-parameter norms, 2 all-reduces, "
        "multiply always)": timeit(lambda: ds_clip_grad_norm_(params, 1.0, mpu=ds.mpu), repeat),
        "before: step guard's separate norm pass": timeit(lambda: _grads_finite(params), repeat),
        "before: separate global norm for the log (log steps only)":
            timeit(lambda: global_grad_norm(params, rt.state), repeat),
        "now: one fused norm pass (guard verdict + clip norm + logged norm)":
            timeit(lambda: check_grads(params, rt.state, global_norm=True), repeat),
        "now: clipping multiply (only when the coefficient is below 1)":
            timeit(lambda: torch._foreach_mul_([p.grad for p in params], 0.999), repeat),
        "bare loop: torch.nn.utils.clip_grad_norm_(foreach=True)":
            timeit(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), repeat),
    }
    ds.zero_grad()

    # 2. alternating step timing
    wall: dict[str, list[float]] = {"trainer": [], "bare": []}
    cpu: dict[str, list[float]] = {"trainer": [], "bare": []}
    for i in range(pairs):
        order = (("trainer", trainer_step), ("bare", bare_step))
        for kind, fn in order if i % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                fn()
            wall[kind].append((time.perf_counter() - t0) / steps)
            cpu[kind].append((time.process_time() - c0) / steps)
    pair_ratios = [b / t for t, b in zip(wall["trainer"], wall["bare"])]

    # 3. operator counts of one step each
    t_ops, t_ms = op_counts(trainer_step)
    b_ops, b_ms = op_counts(bare_step)
    diff = {k: t_ops.get(k, 0) - b_ops.get(k, 0) for k in set(t_ops) | set(b_ops)}
    diff = {k: v for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if v}

    metrics.close()
    return {
        "model": model,
        "parameters": sum(p.numel() for p in params),
        "gradient_mb": grad_mb,
        "threads": torch.get_num_threads(),
        "config": str(cfg_path.relative_to(ROOT)),
        "pieces": pieces,
        "alternating": {
            "steps_per_sample": steps,
            "trainer_wall_s": wall["trainer"],
            "bare_wall_s": wall["bare"],
            "trainer_cpu_s": cpu["trainer"],
            "bare_cpu_s": cpu["bare"],
            "ratio_wall_pairs_median": statistics.median(pair_ratios),
            "ratio_wall_median": statistics.median(wall["bare"]) / statistics.median(
                wall["trainer"]),
            "ratio_cpu_median": statistics.median(cpu["bare"]) / statistics.median(
                cpu["trainer"]),
        },
        "profiler": {
            "trainer_self_cpu_ms": t_ms,
            "bare_self_cpu_ms": b_ms,
            "op_count_difference_trainer_minus_bare": diff,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="steps per alternation sample")
    p.add_argument("--repeat", type=int, default=15, help="calls per timed piece")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "step_profile.json"))
    args = p.parse_args(argv)
    ensure_data()
    os.chdir(ROOT)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    models = args.models or (["7M"] if args.quick else ["7M", "30M"])
    pairs = args.pairs or (4 if args.quick else 8)
    out: dict[str, Any] = {"quick": args.quick, "load_average_at_start": list(os.getloadavg()),
                           "method": __doc__, "models": {}}
    import torch

    # One process builds several trainers: initialize torch.distributed once.
    from megatron.runtime.distributed import init_distributed

    init_distributed("gloo")
    for model in models:
        res = profile_model(model, pairs, args.steps if model == "7M" else 1, args.repeat)
        out["models"][model] = res
        alt = res["alternating"]
        print(f"{model}: trainer/bare {alt['ratio_wall_median']:.3f} wall (pairs median "
              f"{alt['ratio_wall_pairs_median']:.3f}), {alt['ratio_cpu_median']:.3f} CPU time; "
              f"threads {torch.get_num_threads()}")
        for piece, t in res["pieces"].items():
            print(f"  {t['best_ms']:8.2f} ms best, {t['median_ms']:8.2f} ms median  {piece}")
    out["load_average_at_end"] = list(os.getloadavg())
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
