"""Tokens per second of one Mamba, RWKV-6, gMLP and attention layer of the same width on CPU.

    python bench/bench_ssm.py [--hidden 256] [--seq 256] [--batch 4] [--repeats 5]
                              [--output bench/results/ssm.json]

Each layer is built as the model builds it (``block_specs``: the same class and arguments, a
2-layer model of that type, the first layer) and timed on random hidden states ``[seq, batch,
hidden]``: forward + backward (training) and forward alone under ``no_grad`` (a prompt), plus
the Mamba and RWKV recurrences alone, step by step against the chunked form. The cases are
measured in turn, ``--repeats`` rounds, and each number is the median round (the machine is
shared). Writes a JSON record with the machine, the settings and every sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import environment  # noqa: E402

from megatron.model.blocks import block_specs  # noqa: E402
from megatron.model.layout import Activations  # noqa: E402
from megatron.model.ssm_scan import (  # noqa: E402
    selective_scan_chunked,
    selective_scan_ref,
    wkv6_chunked,
    wkv6_ref,
)
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config  # noqa: E402
from megatron.parallel import ParallelState  # noqa: E402

KINDS = ("global", "mamba", "rwkv", "gmlp")


def build_layer(kind: str, hidden: int, seq: int, heads: int) -> torch.nn.Module:
    values = {"num_layers": 2, "hidden_size": hidden, "num_attention_heads": heads,
              "seq_length": seq, "train_micro_batch_size_per_gpu": 1, "pos_emb": "none",
              "attention_config": [[[kind], 2]], "tokenizer_type": "CharLevelTokenizer"}
    cfg = resolve_config(merge_configs([("bench", values)]),
                         RunFacts(world_size=1, purpose=None, launching=False))
    specs = block_specs(cfg.model, padded_vocab_size=256, state=ParallelState.single(),
                        tracker=None, sequence_parallel=False)
    torch.manual_seed(0)
    return next(s for s in specs if s.entry.kind == "layer").build()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def layer_cases(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    from megatron.model.attention import AttentionInputs

    positions = torch.arange(args.seq).expand(args.batch, args.seq)
    inputs = AttentionInputs(positions, None, None, 0)
    cases: dict[str, Callable[[], Any]] = {}
    for kind in KINDS:
        layer = build_layer(kind, args.hidden, args.seq, args.heads)
        x = torch.randn(args.seq, args.batch, args.hidden)

        def train(layer: torch.nn.Module = layer, x: torch.Tensor = x) -> None:
            h = x.clone().requires_grad_(True)
            layer(Activations(h, inputs)).x.square().mean().backward()

        def forward(layer: torch.nn.Module = layer, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                layer(Activations(x, inputs))

        cases[f"{kind} train"] = train
        cases[f"{kind} forward"] = forward
    return cases


def scan_cases(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(0)
    b, d, n, length = args.batch, 2 * args.hidden, 16, args.seq
    x, dt, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=g) for _ in range(2))
    A, D = -torch.rand(d, n, generator=g) * 4, torch.randn(d, generator=g)
    heads, size = args.hidden // 64 or 1, 64
    r, k, v, w = (torch.randn(b, heads, length, size, generator=g) for _ in range(4))
    u = torch.randn(heads, size, generator=g)
    return {
        "mamba scan step-by-step": lambda: selective_scan_ref(x, dt, A, B, C, D, z),
        "mamba scan chunked": lambda: selective_scan_chunked(x, dt, A, B, C, D, z),
        "rwkv wkv step-by-step": lambda: wkv6_ref(r, k, v, w, u),
        "rwkv wkv chunked": lambda: wkv6_chunked(r, k, v, w, u),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="bench/results/ssm.json")
    args = p.parse_args(argv)
    cases = {**layer_cases(args), **scan_cases(args)}
    for fn in cases.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    tokens = args.batch * args.seq
    results = {name: {"median_s": statistics.median(s), "samples_s": s,
                      "tokens_per_s": tokens / statistics.median(s)}
               for name, s in samples.items()}
    record = {"settings": vars(args), "threads": torch.get_num_threads(),
              "machine": environment(), "results": results}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"hidden {args.hidden}, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; tokens/s (median of {args.repeats})")
    for name, res in results.items():
        print(f"  {name:28s} {res['tokens_per_s']:12,.0f}")
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()
