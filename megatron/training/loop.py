"""The training loop: steps, evaluation, checkpoints, logging, signals.

Order of one run (``train(argv)``): start-up (config, distributed, seeds) -> tokenizer ->
sample budget -> model, optimizer, LR schedule and DeepSpeed engine -> load a checkpoint ->
datasets and loaders positioned at the consumed-sample counts -> train -> test.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron import accelerator
from megatron.checkpoint.resume import LoadOptions, SaveOptions, load_checkpoint, save_checkpoint
from megatron.neox_arguments import NeoXConfig
from megatron.training.control import StopSignal
from megatron.training.data_setup import (
    LMBatch,
    SampleBudget,
    build_datasets,
    cycle_from,
    lm_batch,
    loader,
    sample_budget,
    tokenizer_from_config,
)
from megatron.training.engine_setup import Engine, build_engine
from megatron.training.runtime import Runtime, start


@dataclass
class Progress:
    """What advances as training runs, and what a checkpoint stores to resume exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iters: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    interval_start: float = field(default_factory=time.time)
    interval_iters: int = 0

    def client_state(self, scheduler: Any) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "consumed_train_samples": self.consumed_train_samples,
            "consumed_valid_samples": self.consumed_valid_samples,
            "skipped_iters": self.skipped_iters,
            "lr_scheduler": scheduler.state_dict(),
        }


def _timed(timers: Any, name: str) -> Any:
    """A timer context for the wall-clock breakdown, or nothing when it is off."""
    return timers(name).timing() if timers is not None else contextlib.nullcontext()


class Trainer:
    def __init__(self, rt: Runtime, cfg: NeoXConfig, engine: Engine, budget: SampleBudget,
                 tokenizer: Any, metrics: Any):
        self.rt, self.cfg, self.engine, self.budget = rt, cfg, engine, budget
        self.tokenizer, self.metrics = tokenizer, metrics
        self.progress = Progress()
        self.guard = engine.guard
        self.stop = StopSignal(cfg.training.save_on_signal)
        self.inject = set(cfg.training.inject_nonfinite_loss_iters or ())
        self.started = time.time()

    # ------------------------------------------------------------------ checkpoints
    def config_files(self) -> dict[str, str]:
        files = {"merged.yml": self.cfg.merged.to_yaml()}
        for i, (name, text) in enumerate(self.cfg.merged.texts.items()):
            files[f"{i:02d}_{name.replace('/', '_')}"] = text
        return files

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.save:
            return
        save_checkpoint(
            self.engine.ds, SaveOptions(ck.save, ck.keep_last_n_checkpoints,
                                        save_optimizer=not ck.no_save_optim,
                                        save_rng=not ck.no_save_rng),
            iteration=self.progress.iteration,
            client_state=self.progress.client_state(self.engine.scheduler),
            tracker=self.rt.tracker, config_files=self.config_files(),
            kill_before_complete=self.progress.iteration in
            (self.cfg.training.inject_kill_during_save_iters or ()))
        self.metrics.info(f"saved checkpoint at iteration {self.progress.iteration} to {ck.save}")
        if self.engine.is_pipeline:
            diff = self.engine.tied_weight_difference()
            if diff is not None:
                self.metrics.info(f"tied weights: max |difference| between stages {diff:g}")

    def load(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        loaded = load_checkpoint(
            self.engine.ds,
            LoadOptions(ck.load, load_optimizer=not ck.no_load_optim,
                        load_rng=not ck.no_load_rng, finetune=ck.finetune),
            tracker=self.rt.tracker, log=self.metrics.info)
        if loaded is None or ck.finetune:
            return
        cs = loaded.client_state
        p = self.progress
        p.iteration = loaded.iteration
        p.consumed_train_samples = int(cs.get("consumed_train_samples",
                                              p.iteration * self.cfg.training.train_batch_size))
        p.consumed_valid_samples = int(cs.get("consumed_valid_samples", 0))
        p.skipped_iters = int(cs.get("skipped_iters", 0))
        if "lr_scheduler" in cs:
            self.engine.scheduler.load_state_dict(cs["lr_scheduler"])

    def should_save(self, iteration: int) -> bool:
        ck = self.cfg.checkpoint
        if ck.extra_save_iters and iteration in ck.extra_save_iters:
            return True
        interval = ck.save_interval
        if not interval:
            return False
        if ck.checkpoint_scale == "log":
            power = 1
            while power < iteration:
                power *= interval
            return power == iteration
        return iteration % interval == 0

    # ------------------------------------------------------------------ steps
    def _micro_batches(self, it: Iterator[dict[str, torch.Tensor]]) -> Iterator[LMBatch]:
        eod = self.tokenizer.eod
        for raw in it:
            yield lm_batch(raw, self.cfg, eod, self.rt.device)

    def train_step(self, batches: Iterator[LMBatch]) -> tuple[float, bool]:
        """One optimizer step over ``gradient_accumulation_steps`` micro batches."""
        eng = self.engine
        inject = self.progress.iteration + 1 in self.inject and eng.inject_here
        measure = (self.progress.iteration + 1) % self.cfg.logging.log_interval == 0
        if eng.is_pipeline:
            eng.loss_hook.inject = inject
            loss = eng.ds.train_batch(data_iter=eng.pipeline_inputs(batches))
            value = float(loss.detach().float())
        else:
            gas = self.cfg.training.gradient_accumulation_steps or 1
            timers = eng.timers if self.cfg.ds.wall_clock_breakdown else None
            losses = []
            for i in range(gas):
                with _timed(timers, "data"):
                    batch = next(batches)
                with _timed(timers, "forward"):
                    loss = eng.forward_loss(batch)
                if inject and i == 0:
                    loss = loss * float("nan")
                self.guard.note_loss(loss)
                with _timed(timers, "backward"):
                    eng.ds.backward(loss)
                losses.append(loss.detach())
                with _timed(timers, "optimizer"):
                    if i == gas - 1:
                        # one pass over the gradients: the guard's verdict, the norm to clip
                        # by and, at log steps, the logged norm
                        finite = eng.before_step(measure_norm=measure)
                        self.guard.decide(grads_finite=finite)
                    eng.ds.step()
            total = 0.0
            for loss in losses:  # read after the update: no host sync per micro batch
                total += float(loss)
            value = total / gas
        skipped = self.guard.end_step()
        return value, skipped

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, it: Iterator[dict[str, torch.Tensor]] | None, name: str) -> float | None:
        if it is None:
            return None
        eng, t = self.engine, self.cfg.training
        eng.ds.eval()
        batches = self._micro_batches(it)
        losses = []
        for _ in range(t.eval_iters):
            if eng.is_pipeline:
                losses.append(float(eng.ds.eval_batch(data_iter=eng.pipeline_inputs(batches))))
            else:
                gas = t.gradient_accumulation_steps or 1
                losses += [float(eng.forward_loss(next(batches))) for _ in range(gas)]
        eng.ds.train()
        loss = sum(losses) / max(1, len(losses))
        if not eng.is_pipeline:
            loss = eng.dp_mean(loss)
        if name == "validation":
            self.progress.consumed_valid_samples += t.eval_iters * (t.train_batch_size or 0)
        self.metrics.log_eval(self.progress.iteration, loss, split=name)
        return loss

    # ------------------------------------------------------------------ the loop
    def train(self, train_set: Any, valid_set: Any) -> str:
        """Run to train_iters; returns why it stopped."""
        cfg, p, t = self.cfg, self.progress, self.cfg.training
        if p.iteration >= self.budget.train_iters or not t.do_train:
            return "done"
        train_it = iter(loader(train_set, cfg, self.rt.state, p.consumed_train_samples))
        batches = self._micro_batches(train_it)
        valid_it = cycle_from(valid_set, cfg, self.rt.state, p.consumed_valid_samples) \
            if t.do_valid else None
        self.engine.ds.train()
        if p.iteration == 0 and 0 in (cfg.checkpoint.extra_save_iters or ()):
            self.save()  # the initial weights (Pythia-style step 0 checkpoint)
        p.interval_start, p.interval_iters = time.time(), 0
        reason = "done"
        while p.iteration < self.budget.train_iters:
            if self.stop.should_stop():
                self.metrics.info(f"stop requested by a signal: saving at iteration {p.iteration}")
                self.save()
                return "signal"
            loss, skipped = self.train_step(batches)
            p.iteration += 1
            p.consumed_train_samples += t.train_batch_size or 0
            p.interval_iters += 1
            if skipped:
                p.skipped_iters += 1
            else:
                self.engine.scheduler.step()
                p.loss_sum += loss
                p.loss_count += 1
            if p.iteration % cfg.logging.log_interval == 0 or \
                    p.iteration == self.budget.train_iters:
                self.log_training()
            if t.do_valid and valid_it is not None and p.iteration % t.eval_interval == 0:
                self.evaluate(valid_it, "validation")
            saved = False
            if self.should_save(p.iteration):
                self.save()
                saved = True
            if t.exit_interval and p.iteration % t.exit_interval == 0:
                if not saved:
                    self.save()
                reason = "exit_interval"
                break
        else:
            if not self.should_save(p.iteration):
                self.save()
        return reason

    def log_training(self) -> None:
        p, eng = self.progress, self.engine
        elapsed = time.time() - p.interval_start
        loss = p.loss_sum / p.loss_count if p.loss_count else float("nan")
        if not eng.is_pipeline:
            loss = eng.dp_mean(loss)
        self.metrics.log_train(
            p.iteration, lm_loss=loss, lr=eng.scheduler.get_lr(), grad_norm=eng.grad_norm(),
            loss_scale=eng.loss_scale(), step_time_s=elapsed / max(1, p.interval_iters),
            skipped_iters=p.skipped_iters, consumed_samples=p.consumed_train_samples,
            elapsed_s=time.time() - self.started,
        )
        if self.cfg.ds.wall_clock_breakdown:
            self.metrics.info(eng.timers.breakdown_line(normalizer=max(1, p.interval_iters)))
        p.loss_sum, p.loss_count, p.interval_iters = 0.0, 0, 0
        p.interval_start = time.time()


def train(argv: list[str] | None = None) -> int:
    rt = start(argv, purpose="train")
    tokenizer = tokenizer_from_config(rt.cfg)
    cfg = rt.cfg.with_vocab_size(tokenizer.vocab_size)
    budget = sample_budget(cfg)
    from megatron.training.metrics_setup import build_metrics

    metrics = build_metrics(cfg, rt, budget)
    engine = build_engine(cfg, rt, budget.train_iters)
    trainer = Trainer(rt, cfg, engine, budget, tokenizer, metrics)
    trainer.load()
    train_set, valid_set, test_set = build_datasets(cfg, budget)
    try:
        reason = trainer.train(train_set, valid_set)
        if reason == "done" and cfg.training.do_test and test_set is not None:
            trainer.evaluate(cycle_from(test_set, cfg, rt.state, 0), "test")
    finally:
        trainer.stop.restore()
        metrics.close()
    accelerator.synchronize()
    return 0
