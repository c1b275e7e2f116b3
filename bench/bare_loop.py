"""The bare PyTorch training loop the trainer is compared against.

    python bench/bare_loop.py CONFIG.yml --warmup 5 --interval 5 --intervals 4 --output out.json

One process, no DeepSpeed, no framework loop: the same ``GPTModel`` class built from the same
YAML config (resolved with world size 1, the same init seed), the same micro batch and
precision, ``torch.optim.AdamW`` (``foreach``, the trainer's hyper-parameters and its
weight-decay / no-weight-decay parameter groups) with ``torch.nn.utils.clip_grad_norm_`` at
the config's ``gradient_clipping``, the trainer's learning-rate schedule and the same loss
(``megatron.model.lm_loss``). The token
batches are the trainer's own first batches (the same dataset, split, seed and sampler order),
read and turned into tensors *before* the timed loop.

bf16 is done the way DeepSpeed's bf16 optimizer does it, without DeepSpeed: the model runs in
bf16, the optimizer keeps fp32 master weights and fp32 gradients; each step copies the bf16
gradients into persistent fp32 buffers, clips and steps the fp32 masters, and copies them back
into the bf16 weights.

Timing: ``--warmup`` steps untimed, then ``--intervals`` intervals of ``--interval`` steps;
each interval's mean step time is one sample (the trainer's ``metrics.jsonl`` ``step_time_s``
with ``log_interval = --interval`` measures the same thing). Writes a JSON record with the
samples, tokens per step, the loss curve and the peak RSS (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from megatron.model import GPTModel, lm_loss
from megatron.neox_arguments import RunFacts, load_config_files, resolve_config
from megatron.parallel import ParallelState
from megatron.runtime import tokenizer_from_config
from megatron.training.data_setup import (
    build_datasets,
    lm_batch,
    loader,
    sample_budget,
)
from megatron.training.lr_schedule import build_lr_scheduler
from megatron.training.optimizers import optimizer_kwargs, param_groups

ROOT = Path(__file__).resolve().parents[1]


def load_config(path: str):
    merged = load_config_files([path])
    cfg = resolve_config(merged, RunFacts(world_size=1, gpu=False, launching=False,
                                          purpose="train"))
    tok = tokenizer_from_config(cfg)
    return cfg.with_vocab_size(tok.vocab_size), tok


def batches(cfg, tok, count: int) -> list:
    """The trainer's first ``count`` micro batches (rank 0 of data-parallel size 1)."""
    budget = sample_budget(cfg)
    train_set, _, _ = build_datasets(cfg, budget)
    state = ParallelState.single()
    out = []
    it = iter(loader(train_set, cfg, state, 0))
    while len(out) < count:
        try:
            raw = next(it)
        except StopIteration:
            it = iter(loader(train_set, cfg, state, 0))
            continue
        out.append(lm_batch(raw, cfg, tok.eod, torch.device("cpu")))
    return out


class BareStep:
    """forward, loss, backward, clip, AdamW step, zero_grad -- nothing else."""

    def __init__(self, cfg, model: GPTModel, bf16: bool):
        self.cfg, self.model, self.bf16 = cfg, model, bf16
        self.state = ParallelState.single()
        self.clip = float(cfg.training.gradient_clipping)
        kwargs = optimizer_kwargs(cfg.optim)
        groups = param_groups(model, kwargs["weight_decay"])
        self.params = [p for g in groups for p in g["params"]]
        if bf16:
            model.to(torch.bfloat16)
            self.masters = [p.detach().float() for p in self.params]
            self.master_grads = [torch.zeros_like(m) for m in self.masters]
            for m, g in zip(self.masters, self.master_grads):
                m.grad = g
            index = {id(p): i for i, p in enumerate(self.params)}
            groups = [{**g, "params": [self.masters[index[id(p)]] for p in g["params"]]}
                      for g in groups]
        self.optimizer = torch.optim.AdamW(groups, **kwargs, foreach=True)
        # The trainer's learning-rate schedule (a hyper-parameter like the others): a few float
        # operations per step, and it makes the loss curves of the two loops comparable.
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.lr, cfg.optim,
                                            cfg.training.train_iters)
        self.fp32_loss = not cfg.model.fp16_lm_cross_entropy

    def __call__(self, b) -> float:
        logits = self.model(b.tokens, position_ids=b.position_ids,
                            attention_mask=b.attention_mask)
        loss = lm_loss(logits, b.labels, b.loss_mask, self.state, fp32=self.fp32_loss)
        loss.backward()
        if self.bf16:
            torch._foreach_copy_(self.master_grads, [p.grad for p in self.params])
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.masters, self.clip, foreach=True)
            self.optimizer.step()
            torch._foreach_copy_([p.data for p in self.params], self.masters)
            for p in self.params:
                p.grad = None
        else:
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--intervals", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores, as the trainer gives one rank)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cfg, tok = load_config(args.config)
    if cfg.training.gradient_accumulation_steps not in (None, 1):
        raise SystemExit("bare_loop.py: gradient_accumulation_steps must be 1")
    total = args.warmup + args.interval * args.intervals
    data = batches(cfg, tok, total)
    torch.manual_seed(cfg.training.seed)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single(), init_seed=cfg.training.seed)
    model.train()
    bf16 = cfg.precision.precision == "bfloat16"
    if cfg.precision.precision not in ("fp32", "bfloat16"):
        raise SystemExit(f"bare_loop.py: precision {cfg.precision.precision} is not benchmarked")
    step = BareStep(cfg, model, bf16)

    losses, samples = [], []
    for i in range(args.warmup):
        losses.append(step(data[i]))
    i = args.warmup
    for _ in range(args.intervals):
        t0 = time.perf_counter()
        for _ in range(args.interval):
            losses.append(step(data[i]))
            i += 1
        samples.append((time.perf_counter() - t0) / args.interval)
    tokens = int(data[0].tokens.numel())
    record = {
        "kind": "bare",
        "config": args.config,
        "threads": torch.get_num_threads(),
        "precision": cfg.precision.precision,
        "tokens_per_step": tokens,
        "warmup": args.warmup,
        "interval": args.interval,
        "step_time_samples_s": samples,
        "losses": losses,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
