"""Training throughput on one GPU: bf16 eager, bf16 compiled (``torch_compile``) and FP8
compiled (``fp8_training``), for the 1.3B recipe model and a smaller one (125M).

    python bench/bench_gpu.py            # both models, all three modes
    python bench/bench_gpu.py --quick    # the 1.3B model only, fewer steps (make gpu-check)

Each case runs in its own process, built as ``train.py`` builds the trainer (``runtime.start``
on the recipe config, ``build_engine``: DeepSpeed's engine with its bf16 optimizer, the step
guard, the fused AdamW), and steps it on random tokens: ``--warmup`` steps (the compile
happens there), then ``--steps`` timed steps between two device synchronizations. Reported:
tokens/s, TFLOP/s per device and MFU (``megatron.model_size.flops_per_token``, no
recompute, against the device's dense BF16 peak from ``megatron.logging.mfu``), the peak
device memory, and the losses of every step (the FP8 loss gap is FP8 against bf16 eager on
the same batches). The recipe's sequence length (2048) is kept; pipeline and tensor
parallelism, ZeRO and activation checkpointing are switched off (one GPU holds the model).

Writes ``bench/results/gpu.json`` and regenerates ``bench/README.md``. On a machine without
a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "bench" / "results" / "gpu.json"
RUN_DIR = ROOT / "runs" / "bench-gpu"
MODELS = {"1.3B": "configs/1-3B.yml", "125M": "configs/125M.yml"}
MICRO_BATCH = {"1.3B": 4, "125M": 8}  # the recipe table's micro batch for 1.3B
MODES = {
    "bf16-eager": {},
    "bf16-compiled": {"torch_compile": True},
    "fp8-compiled": {"fp8_training": True},
}
VOCAB = 50277  # the GPT-NeoX tokenizer (padded by the config's make_vocab_size_divisible_by)
NEEDS_GPU = "bench/bench_gpu.py needs a CUDA GPU (none is visible here): " \
            "nothing was measured"


def case_values(model: str, mode: str, micro_batch: int) -> dict[str, Any]:
    """The recipe config with the single-GPU changes (see the module docstring)."""
    from megatron.neox_arguments import load_config_files

    values = dict(load_config_files([str(ROOT / MODELS[model])]).values)
    values.update({
        "pipe_parallel_size": 0, "model_parallel_size": 1,
        "zero_optimization": {"stage": 0}, "checkpoint_activations": False,
        "partition_activations": False, "fp16": {"enabled": False}, "bf16": {"enabled": True},
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
        "train_iters": 100_000, "log_interval": 100_000, "save": None, "load": None,
        "seed": 1234, **MODES[mode],
    })
    values.pop("train_batch_size", None)
    return values


def run_case(model: str, mode: str, micro_batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """One case in this process (the child side of :func:`main`)."""
    import torch
    import yaml
    from megatron.training.runtime import start

    from megatron import accelerator
    from megatron.logging.mfu import achieved_tflops, mfu, peak_tflops
    from megatron.model_size import flops_per_token, parameter_count
    from megatron.training.data_setup import lm_batch
    from megatron.training.engine_setup import build_engine

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    path = RUN_DIR / f"{model}-{mode}.yml"
    path.write_text(yaml.safe_dump(case_values(model, mode, micro_batch)))
    rt = start([str(path)], purpose=None)
    cfg = rt.cfg.with_vocab_size(VOCAB)
    accelerator.reset_peak_memory_stats()
    engine = build_engine(cfg, rt, 100_000)
    seq = cfg.model.seq_length
    padded = cfg.tokenizer.padded_vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [lm_batch({"text": torch.randint(0, VOCAB, (micro_batch, seq + 1), generator=gen)},
                        cfg, 0, rt.device) for _ in range(4)]

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        loss = engine.forward_loss(batch)
        engine.guard.note_loss(loss)
        engine.ds.backward(loss)
        engine.guard.decide(grads_finite=engine.before_step(measure_norm=False))
        engine.ds.step()
        engine.guard.end_step()
        return loss.detach()

    started = time.perf_counter()
    losses = [step(i) for i in range(warmup)]
    accelerator.synchronize()
    warmup_s = time.perf_counter() - started
    t0 = time.perf_counter()
    losses += [step(warmup + i) for i in range(steps)]
    accelerator.synchronize()
    elapsed = time.perf_counter() - t0
    tokens_per_s = micro_batch * seq * steps / elapsed
    fpt = flops_per_token(cfg.model, padded)
    peak, peak_source = peak_tflops(accelerator.device_name(),
                                    cfg.training.peak_theoretical_tflops)
    return {
        "model": model, "mode": mode, "device": accelerator.device_name(),
        "parameters": parameter_count(cfg.model, padded), "seq_length": seq,
        "micro_batch": micro_batch, "warmup_steps": warmup, "timed_steps": steps,
        "warmup_s": warmup_s, "step_s": elapsed / steps, "tokens_per_s": tokens_per_s,
        "tflops": achieved_tflops(tokens_per_s, fpt, 1),
        "mfu": mfu(tokens_per_s, fpt, peak, 1), "peak_tflops": peak, "peak_source": peak_source,
        "peak_memory_gb": accelerator.max_memory_allocated() / 2**30,
        "losses": [float(x) for x in losses],
    }


def _child(args: argparse.Namespace) -> int:
    result = run_case(args.model, args.mode, args.micro_batch, args.warmup, args.steps)
    Path(args.result).write_text(json.dumps(result))
    return 0


def _run_child(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    result = RUN_DIR / f"{model}-{mode}.json"
    result.unlink(missing_ok=True)
    micro_batch = args.micro_batch or MICRO_BATCH[model]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model,
           "--mode", mode, "--micro-batch", str(micro_batch), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.case_timeout)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        code = -1
        tail = (out.decode() if isinstance(out, bytes) else out)[-3000:] + \
            f"\n(timed out after {args.case_timeout} s)"
    wall = time.time() - started
    if code == 0 and result.is_file():
        data = json.loads(result.read_text())
        data["process_s"] = wall
        return data
    return {"model": model, "mode": mode, "error": f"exit {code}", "log_tail": tail,
            "process_s": wall}


def loss_gaps(cases: list[dict[str, Any]]) -> None:
    """Add to each case its largest relative loss gap to bf16 eager of the same model."""
    ref = {c["model"]: c["losses"] for c in cases if c.get("mode") == "bf16-eager"
           and "losses" in c}
    for c in cases:
        base = ref.get(c["model"])
        if base and "losses" in c and c["mode"] != "bf16-eager":
            c["max_relative_loss_gap"] = max(abs(a - b) / abs(b)
                                             for a, b in zip(c["losses"], base))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the 1.3B model only, 2 warm-up and 6 timed steps")
    p.add_argument("--models", nargs="*", choices=sorted(MODELS))
    p.add_argument("--modes", nargs="*", choices=list(MODES))
    p.add_argument("--warmup", type=int, default=None, help="default 3 (--quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="default 10 (--quick: 6)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--case-timeout", type=float, default=300.0)
    p.add_argument("--output", default=str(OUT))
    p.add_argument("--no-report", action="store_true", help="leave bench/README.md alone")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    import torch

    from megatron import accelerator

    if not accelerator.gpu_present():
        print(NEEDS_GPU, flush=True)
        return 0
    default_models = ["1.3B"] if args.quick else list(MODELS)
    plan = [(m, mode) for m in (args.models or default_models) for mode in (args.modes or MODES)]
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.steps = args.steps if args.steps is not None else (6 if args.quick else 10)
    started = time.time()
    cases = []
    for model, mode in plan:
        case = _run_child(model, mode, args)
        cases.append(case)
        if "error" in case:
            print(f"{model} {mode}: FAILED ({case['error']})\n{case['log_tail']}", flush=True)
        else:
            mfu_text = f"{case['mfu']:.1%}" if case["mfu"] is not None else "n/a"
            print(f"{model} {mode}: {case['tokens_per_s']:,.0f} tokens/s, "
                  f"{case['tflops']:.1f} TFLOP/s, MFU {mfu_text}, peak memory "
                  f"{case['peak_memory_gb']:.1f} GiB, warm-up {case['warmup_s']:.0f} s",
                  flush=True)
    loss_gaps(cases)
    devices = sorted({c["device"] for c in cases if "device" in c})
    result = {"device": devices[0] if devices else accelerator.device_name(),
              "torch": torch.__version__, "quick": bool(args.quick),
              "seconds": time.time() - started, "cases": cases,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    if not args.no_report:
        subprocess.run([sys.executable, str(ROOT / "bench" / "report.py")], cwd=ROOT, check=False)
    return 1 if any("error" in c for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
