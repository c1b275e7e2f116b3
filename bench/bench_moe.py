"""Mixture-of-experts step time against the dense model of the same active size.

Runs on 2 gloo CPU ranks (data parallel 2) through DeepSpeed's engine (ZeRO 0, fp32):

* ``dense``: the MLP of width ``4 x hidden``;
* ``moe-ep1``: ``--experts`` experts of width ``4 x hidden / top_k``, ``--top-k`` per token
  (the same active MLP parameters per token), every rank computing every expert;
* ``moe-ep2``: the same MoE with expert parallelism 2 (each rank stores and computes half the
  experts, tokens exchanged with ``all_to_all_single``, expert gradients reduced over the
  expert-data-parallel group).

For each case: the median step time (forward, backward and update of ``--micro`` micro
batches), tokens per second per rank, and for the MoE cases the share of the step spent inside
``all_to_all_single`` (timed by wrapping the call in this process) and the expert parameters
stored per rank. Results go to
``bench/results/moe.json``.

    python bench/bench_moe.py [--steps 6] [--hidden 128] [--layers 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(args: argparse.Namespace, case: str) -> Any:
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

    values: dict[str, Any] = {
        "num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 4,
        "seq_length": args.seq, "train_micro_batch_size_per_gpu": args.batch,
        "tokenizer_type": "CharLevelTokenizer", "make_vocab_size_divisible_by": 128,
        "activation": "gelu",
    }  # fmt: skip
    if case != "dense":
        values.update(moe_num_experts=args.experts, moe_top_k=args.top_k,
                      moe_router_type="topk", moe_aux_loss_coeff=0.01,
                      intermediate_size=4 * args.hidden // args.top_k,
                      expert_model_parallel_size=2 if case == "moe-ep2" else 1)
    merged = merge_configs([("bench", values)])
    return resolve_config(merged, RunFacts(world_size=2, launching=False, purpose=None))\
        .with_vocab_size(256)


class _AllToAllTimer:
    """Wraps ``torch.distributed.all_to_all_single`` to add up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.original = torch.distributed.all_to_all_single

    def __call__(self, *a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = self.original(*a, **kw)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def _case(args: argparse.Namespace, case: str, timer: _AllToAllTimer) -> dict[str, Any]:
    import deepspeed

    from megatron.model import build_model, lm_loss
    from megatron.model.moe import set_aux_loss_scale
    from megatron.model_size import active_parameter_count, parameter_count
    from megatron.parallel import ParallelState, RankTopology
    from megatron.parallel.experts import split_expert_param_groups

    cfg = _config(args, case)
    ep = 2 if case == "moe-ep2" else 1
    state = ParallelState.initialize(RankTopology(2, 1, 1), expert_parallel=ep)
    model = build_model(cfg.model, cfg.act_ckpt, cfg.parallelism, padded_vocab_size=256,
                        state=state, tracker=None, init_seed=1)
    set_aux_loss_scale(model, 1.0 / args.micro)
    ds = {"train_batch_size": 2 * args.batch * args.micro,
          "train_micro_batch_size_per_gpu": args.batch,
          "gradient_accumulation_steps": args.micro, "steps_per_print": 10**9,
          "wall_clock_breakdown": False}
    groups = split_expert_param_groups([{"params": model.parameters()}])
    engine, *_ = deepspeed.initialize(model=model, config=ds, mpu=state,
                                      optimizer=torch.optim.AdamW(groups, lr=1e-3))
    g = torch.Generator().manual_seed(state.rank)
    batches = [torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
               for _ in range(args.micro)]
    times, shares = [], []
    for step in range(args.warmup + args.steps):
        torch.distributed.barrier()
        timer.seconds = 0.0
        start = time.perf_counter()
        for tokens in batches:
            x, y = tokens[:, :-1], tokens[:, 1:]
            loss = lm_loss(engine(x), y, torch.ones_like(y, dtype=torch.float), state)
            engine.backward(loss)
            engine.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            shares.append(timer.seconds / elapsed)
    step_time = statistics.median(times)
    tokens = args.batch * args.seq * args.micro
    return {
        "case": case, "expert_parallel": ep, "step_time_s": step_time,
        "step_time_range_s": [min(times), max(times)],
        "tokens_per_s_per_rank": tokens / step_time,
        "all_to_all_share": statistics.median(shares) if case != "dense" else 0.0,
        "parameters": parameter_count(cfg.model, 256),
        "active_parameters": active_parameter_count(cfg.model, 256),
        "expert_parameters_per_rank": sum(p.numel() for n, p in model.named_parameters()
                                          if n.endswith(("mlp.w_in", "mlp.w_out"))),
    }


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    timer = _AllToAllTimer()
    torch.distributed.all_to_all_single = timer  # type: ignore[assignment]
    results = [_case(args, case, timer) for case in ("dense", "moe-ep1", "moe-ep2")]
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "moe.json"))
    args = p.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scratch = Path(args.output).with_suffix(".partial.json")
    mp.spawn(_worker, args=(port, args, str(scratch)), nprocs=2, join=True)
    cases = json.loads(scratch.read_text())
    scratch.unlink()
    dense = cases[0]["step_time_s"]
    for c in cases:
        c["vs_dense"] = c["step_time_s"] / dense
    settings = {**vars(args), "output": os.path.relpath(args.output, ROOT)}
    result = {"settings": settings, "cases": cases, "time": time.time(),
              "load_average": list(os.getloadavg())}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':10} {'step s':>8} {'vs dense':>9} {'tokens/s/rank':>14} {'a2a share':>10} "
          f"{'params':>10} {'active':>10} {'experts/rank':>13}")
    for c in cases:
        print(f"{c['case']:10} {c['step_time_s']:8.3f} {c['vs_dense']:9.2f} "
              f"{c['tokens_per_s_per_rank']:14.0f} {100 * c['all_to_all_share']:9.1f}% "
              f"{c['parameters']:10,} {c['active_parameters']:10,} "
              f"{c['expert_parameters_per_rank']:13,}")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
