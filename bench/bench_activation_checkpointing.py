"""Activation memory of activation checkpointing and its DeepSpeed options, on CPU.

Two gloo ranks with tensor parallelism 2 train the same GPT model (fp32, dropout on) in each
case:

* ``none``: no checkpointing;
* ``checkpoint``: ``checkpoint_activations`` (one layer per chunk);
* ``partition``: + ``partition_activations``;
* ``partition+cpu``: + ``checkpoint_in_cpu``;
* ``partition+contiguous``: + ``contiguous_checkpointing``.

Measured per rank, right after the forward pass of a step (what is held until backward):

* ``autograd_bytes``: tensors autograd saved for the backward pass (counted through
  ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, shared storage once);
* ``checkpoint_bytes``: what DeepSpeed's checkpoint functions keep (each chunk's inputs, whole
  or this rank's partition), with the part in host memory (``host_bytes``);
* ``activation_bytes``: the two together (distinct storages).

Also the median forward + backward time of a step and the first step's loss (equal in every
case). On a CPU-only machine the device is the host, so ``checkpoint_in_cpu`` cannot lower
these numbers: its saving is device memory on GPUs. Results go to
``bench/results/activation_checkpointing.json``.

    python bench/bench_activation_checkpointing.py [--hidden 256] [--layers 4] [--seq 256]
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

CASES: dict[str, dict[str, bool]] = {
    "none": {},
    "checkpoint": {"checkpoint_activations": True},
    "partition": {"checkpoint_activations": True, "partition_activations": True},
    "partition+cpu": {"checkpoint_activations": True, "partition_activations": True,
                      "checkpoint_in_cpu": True},
    "partition+contiguous": {"checkpoint_activations": True, "partition_activations": True,
                             "contiguous_checkpointing": True},
}


def _config(args: argparse.Namespace, keys: dict[str, bool]) -> Any:
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

    values: dict[str, Any] = {
        "num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 8,
        "seq_length": args.seq, "train_micro_batch_size_per_gpu": args.batch,
        "tokenizer_type": "CharLevelTokenizer", "make_vocab_size_divisible_by": 128,
        "model_parallel_size": 2, "attention_dropout": 0.1, "hidden_dropout": 0.1, **keys,
    }  # fmt: skip
    merged = merge_configs([("bench", values)])
    return resolve_config(merged, RunFacts(world_size=2, launching=False, purpose=None))\
        .with_vocab_size(256)


def _storage(t: torch.Tensor) -> tuple[int, int, str]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes(), t.device.type


def _checkpoint_storages(loss: torch.Tensor) -> dict[int, tuple[int, str]]:
    """Storages DeepSpeed's checkpoint functions in the graph of ``loss`` keep."""
    out: dict[int, tuple[int, str]] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for t in getattr(node, "deepspeed_saved_tensors", None) or ():
            if torch.is_tensor(t):
                data = getattr(t, "saved_data", None)
                ptr, nbytes, device = _storage(data if data is not None else t)
                out[ptr] = (nbytes, device)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return out


def _recorder(saved: dict[int, tuple[int, str]], params: set[int]) -> Any:
    """A pack hook that notes every saved tensor's storage (parameters excluded)."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes, device = _storage(t)
        if ptr not in params:
            saved[ptr] = (nbytes, device)
        return t

    return pack


def _case(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from megatron.model import GPTModel
    from megatron.model.gpt import lm_loss
    from megatron.parallel import ParallelState, RankTopology, model_parallel_seed

    cfg = _config(args, CASES[name])
    state = ParallelState.initialize(RankTopology(2, 2, 1))
    tracker = model_parallel_seed(1234, state)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state, tracker=tracker).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    mask = torch.ones(args.batch, args.seq)
    times, loss0, memory = [], None, {}
    for step in range(args.warmup + args.steps):
        saved: dict[int, tuple[int, str]] = {}
        pack = _recorder(saved, params)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(model(tokens), labels, mask, state)
        if step == 0:
            kept = _checkpoint_storages(loss)
            both = {**saved, **kept}
            memory = {
                "autograd_bytes": sum(n for n, _ in saved.values()),
                "checkpoint_bytes": sum(n for n, _ in kept.values()),
                "host_bytes": sum(n for n, d in kept.values() if d == "cpu"),
                "activation_bytes": sum(n for n, _ in both.values()),
            }
            loss0 = loss.item()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"case": name, **memory, "step_time_s": statistics.median(times), "loss": loss0}


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from megatron.runtime.distributed import prepare_deepspeed_comm, quiet_deepspeed

    quiet_deepspeed()
    prepare_deepspeed_comm()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = [_case(args, name) for name in CASES]
    Path(f"{out}.{rank}").write_text(json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output",
                   default=str(ROOT / "bench" / "results" / "activation_checkpointing.json"))
    args = p.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scratch = Path(args.output).with_suffix(".partial")
    mp.spawn(_worker, args=(port, args, str(scratch)), nprocs=2, join=True)
    ranks = []
    for rank in range(2):
        part = Path(f"{scratch}.{rank}")
        ranks.append(json.loads(part.read_text()))
        part.unlink()
    base = ranks[0][0]["activation_bytes"]
    for cases in ranks:
        for c in cases:
            c["vs_none"] = c["activation_bytes"] / base
    settings = {**vars(args), "output": os.path.relpath(args.output, ROOT),
                "tensor_parallel": 2, "precision": "fp32"}
    result = {"settings": settings, "ranks": ranks, "time": time.time(),
              "load_average": list(os.getloadavg())}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    print(f"{'case (rank 0)':22} {'activations MiB':>16} {'vs none':>8} {'autograd MiB':>13} "
          f"{'checkpoints MiB':>16} {'in host MiB':>12} {'step s':>7} {'loss':>9}")
    for c in ranks[0]:
        print(f"{c['case']:22} {c['activation_bytes'] / mib:16.2f} {c['vs_none']:8.3f} "
              f"{c['autograd_bytes'] / mib:13.2f} {c['checkpoint_bytes'] / mib:16.2f} "
              f"{c['host_bytes'] / mib:12.2f} {c['step_time_s']:7.3f} {c['loss']:9.5f}")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
