"""The summary table at the end of ``make gpu-check``: the suite's result, the fp16 overflow
handling, the compile and FP8 loss gaps, and the MFU of each benchmark case.

    python bench/gpu_summary.py --tests runs/gpu-check/tests.jsonl --bench bench/results/gpu.json

Exits 1 when a part failed or a number is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec.pop("name")] = rec
    return out


def pytest_counts(log: Path) -> str:
    if not log.is_file():
        return "no log"
    outcome = r"\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
    pattern = re.compile(rf"({outcome}(?:, {outcome})*) in [\d.]+s")
    for line in reversed(log.read_text().splitlines()):
        found = pattern.search(line)
        if found:
            return found.group(1)
    return "no pytest summary"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def rows(tests: dict[str, dict[str, Any]], bench: dict[str, Any] | None,
         args: argparse.Namespace) -> tuple[list[tuple[str, str]], bool]:
    ok = args.tests_rc == 0 and args.bench_rc == 0
    table = [("GPU suite (make test-gpu)", f"{pytest_counts(Path(args.tests_log))}, exit "
              f"{args.tests_rc}, {args.tests_seconds} s")]
    fp16 = tests.get("fp16_overflow")
    if fp16:
        table.append(("fp16 overflow (injected at step 5)",
                      f"loss scale {fp16['scale_before']:g} -> {fp16['scale_after']:g}, "
                      f"{fp16['skipped']} step skipped, {fp16['scale_end']:g} at the end: "
                      f"{'ok' if fp16['ok'] else 'WRONG'}"))
        ok &= bool(fp16["ok"])
    else:
        table.append(("fp16 overflow", "not measured"))
        ok = False
    for name, label in (("compile_vs_eager", "torch_compile vs eager, max loss gap"),
                        ("act_ckpt_vs_plain", "activation checkpointing, max loss gap"),
                        ("fp8_vs_bf16", "FP8 vs bf16 (tiny model), max loss gap")):
        rec = tests.get(name)
        if rec and "refused" in rec:
            table.append((label, f"refused: {rec['refused']}"))
        else:
            table.append((label, _pct(rec["max_relative_loss_gap"]) if rec else "not measured"))
    for name, label, field in (
            ("sdpa_flash_attention_vs_math", "flash SDPA vs math, max |dlogit|",
             "max_abs_logit_diff"),
            ("sdpa_efficient_attention_vs_math", "efficient SDPA vs math, max |dlogit|",
             "max_abs_logit_diff"),
            ("fused_adamw_vs_unfused", "fused vs unfused AdamW, max |dparam|",
             "max_abs_param_diff"),
            ("kv_cache_generation", "KV-cache generation vs recompute, max |dlogit|",
             "max_abs_logit_diff"),
            ("hf_parity_gpu", "Hugging Face parity on GPU, max |dlogit|", "max_abs_logit_diff")):
        rec = tests.get(name)
        table.append((label, f"{rec[field]:.3g}" if rec else "not measured"))
    ck = tests.get("checkpoint_gpu_cpu")
    table.append(("checkpoint GPU->CPU / CPU->GPU, loss gap",
                  f"{_pct(ck['gap_gpu_to_cpu'])} / {_pct(ck['gap_cpu_to_gpu'])}" if ck
                  else "not measured"))
    if bench is None:
        table.append(("benchmark", "no results"))
        return table, False
    for c in bench["cases"]:
        label = f"{c['model']} {c['mode']}"
        if "error" in c:
            table.append((label, f"FAILED ({c['error']})"))
            ok = False
            continue
        gap = c.get("max_relative_loss_gap")
        table.append((label, f"MFU {_pct(c['mfu'])}, {c['tokens_per_s']:,.0f} tokens/s, "
                      f"{c['peak_memory_gb']:.1f} GiB"
                      + (f", loss gap to bf16 {_pct(gap)}" if gap is not None else "")))
    table.append(("benchmark", f"{bench['device']}, exit {args.bench_rc}, "
                  f"{args.bench_seconds} s"))
    return table, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tests", required=True)
    p.add_argument("--tests-log", default="runs/gpu-check/tests.log")
    p.add_argument("--bench", required=True)
    p.add_argument("--tests-rc", type=int, default=0)
    p.add_argument("--bench-rc", type=int, default=0)
    p.add_argument("--tests-seconds", type=int, default=0)
    p.add_argument("--bench-seconds", type=int, default=0)
    args = p.parse_args(argv)
    bench_path = Path(args.bench)
    bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    table, ok = rows(read_records(Path(args.tests)), bench, args)
    width = max(len(k) for k, _ in table)
    print("\n== GPU check summary " + "=" * 60)
    for key, value in table:
        print(f"{key:<{width}}  {value}")
    print(f"{'result':<{width}}  {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
