"""The training loop: steps, evaluation, checkpoints, logging, signals.

Order of one run (``train(argv)``): start-up (config, distributed, seeds) -> tokenizer ->
sample budget -> model, optimizer, LR schedule and DeepSpeed engine -> load a checkpoint ->
datasets and loaders positioned at the consumed-sample counts -> train -> test.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron import accelerator
from megatron.checkpoint import CheckpointError, forward_check
from megatron.checkpoint.relayout import run_layout
from megatron.checkpoint.resume import (
    Checkpointer,
    LoadOptions,
    SaveOptions,
    load_checkpoint,
    save_checkpoint,
)
from megatron.checkpoint.s3 import S3Target
from megatron.logging.profiler import MemorySnapshot, StepProfiler, trace_dir
from megatron.runtime import Runtime, start
from megatron.training.control import world_max
from megatron.training.curriculum import SeqlenCurriculum, curriculum_active, truncate
from megatron.training.data_setup import (
    LMBatch,
    SampleBudget,
    build_datasets,
    cycle_from,
    loader,
    make_batch,
    sample_budget,
)
from megatron.training.engine import Engine
from megatron.training.engine_setup import build_engine
from megatron.training.stop_signal import STOP_LINE, StopSignal


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


class Trainer:
    """Runs the steps, evaluations and checkpoints of one training run over an
    :class:`~megatron.training.engine.Engine` (the same code for every parallel layout)."""

    def __init__(self, rt: Runtime, engine: Engine, budget: SampleBudget, metrics: Any,
                 stop: StopSignal | None = None):
        self.rt, self.cfg, self.engine, self.budget = rt, rt.cfg, engine, budget
        self.tokenizer, self.metrics = rt.tokenizer, metrics
        self.progress = Progress()
        self.loaded_iteration: int | None = None
        self.saved_iteration: int | None = None
        self.guard = engine.guard
        self.stop = stop if stop is not None else StopSignal()
        if not self.cfg.training.save_on_signal:
            self.stop.disable()
        self.inject = set(self.cfg.training.inject_nonfinite_loss_iters or ())
        self.started = time.time()
        self.resumed_state: dict[str, Any] | None = None
        self.checkpointer = Checkpointer(asynchronous=self.cfg.checkpoint.async_save) \
            if self.cfg.checkpoint.save else None
        block = self.cfg.ds.curriculum_learning
        self.curriculum = SeqlenCurriculum(block) if curriculum_active(block) else None
        self.seqlen: int | None = None  # the curriculum's length for the running step
        self.memory: MemorySnapshot | None = None

    def _validation_logits(self) -> Any:
        cfg = self.cfg
        return forward_check.validation_logits(
            self.engine.ds, seq_length=cfg.model.seq_length,
            micro_batch=cfg.training.train_micro_batch_size_per_gpu or 1,
            vocab_size=self.tokenizer.vocab_size, state=self.rt.state, device=self.rt.device)

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
        self.saved_iteration = self.progress.iteration
        extra = {}
        if ck.checkpoint_validation_with_forward_pass:
            extra[forward_check.CLIENT_KEY] = self._validation_logits()
        line = save_checkpoint(
            self.engine.ds, SaveOptions(ck.save, ck.keep_last_n_checkpoints,
                                        save_optimizer=not ck.no_save_optim,
                                        save_rng=not ck.no_save_rng,
                                        layout=run_layout(self.cfg, self.rt.state),
                                        upload=S3Target(ck.s3_path, ck.s3_chunk_size)
                                        if ck.s3_path else None),
            iteration=self.progress.iteration,
            client_state={**self.progress.client_state(self.engine.scheduler),
                          **self.engine.client_state(), **extra},
            tracker=self.rt.tracker, config_files=self.config_files(),
            kill_before_complete=self.progress.iteration in
            (self.cfg.training.inject_kill_during_save_iters or ()),
            checkpointer=self.checkpointer)
        if line is not None:
            self.metrics.info(line)
        line = self.engine.after_save()
        if line is not None:
            self.metrics.info(line)

    def poll_saves(self) -> None:
        """Log the line of a background save that has finished."""
        if self.checkpointer is not None and (line := self.checkpointer.poll()) is not None:
            self.metrics.info(line)

    def finish_saves(self) -> None:
        """Wait for the save in flight (the end of the run, a stop on a signal)."""
        if self.checkpointer is not None and (line := self.checkpointer.finish()) is not None:
            self.metrics.info(line)

    def load(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        loaded = load_checkpoint(
            self.engine.ds,
            LoadOptions(ck.load, load_optimizer=not ck.no_load_optim,
                        load_rng=not ck.no_load_rng, finetune=ck.finetune,
                        layout=run_layout(self.cfg, self.rt.state),
                        iteration=self.cfg.training.iteration,
                        fresh_prefixes=("reward_head.",)
                        if self.cfg.posttrain.train_impl == "rm" else ()),
            tracker=self.rt.tracker, log=self.metrics.info)
        if loaded is None:
            return
        if ck.checkpoint_validation_with_forward_pass:
            self.validate_loaded(loaded.client_state, loaded.iteration)
        if ck.finetune:
            return
        cs = loaded.client_state
        self.resumed_state = cs
        p = self.progress
        p.iteration = self.loaded_iteration = loaded.iteration
        p.consumed_train_samples = int(cs.get("consumed_train_samples",
                                              p.iteration * self.cfg.training.train_batch_size))
        p.consumed_valid_samples = int(cs.get("consumed_valid_samples", 0))
        p.skipped_iters = int(cs.get("skipped_iters", 0))
        if "lr_scheduler" in cs:
            try:
                self.engine.scheduler.load_state_dict(cs["lr_scheduler"])
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(f"{ck.load}: iteration {loaded.iteration}: {exc}") from None

    def validate_loaded(self, client_state: dict[str, Any], iteration: int) -> None:
        """checkpoint_validation_with_forward_pass: the loaded model's logits must match the
        ones saved with the checkpoint."""
        saved = client_state.get(forward_check.CLIENT_KEY)
        if saved is None:
            self.metrics.info(f"checkpoint_validation_with_forward_pass: iteration {iteration} "
                              "of checkpoint load has no validation logits; not validated")
            return
        problem = forward_check.compare(saved, self._validation_logits())
        failed = world_max([1.0 if problem else 0.0])[0] > 0
        if failed:
            raise CheckpointError(f"{self.cfg.checkpoint.load}: iteration {iteration}: "
                                  "checkpoint_validation_with_forward_pass: "
                                  f"{problem or 'another rank found a mismatch'}")
        self.metrics.info(f"checkpoint_validation_with_forward_pass: iteration {iteration} "
                          "validated (the forward pass gives the saved logits)")

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
    def _micro_batches(self, it: Iterator[dict[str, torch.Tensor]],
                       training: bool = False) -> Iterator[LMBatch]:
        eod = self.tokenizer.eod
        for raw in it:
            batch = make_batch(raw, self.cfg, eod, self.rt.device)
            if training and self.seqlen is not None:
                batch = truncate(batch, self.seqlen)
            yield batch

    def train_step(self, batches: Iterator[LMBatch]) -> tuple[float, bool]:
        """One optimizer step; returns its loss and whether the step guard skipped it."""
        iteration = self.progress.iteration + 1
        if self.curriculum is not None:
            seqlen = self.curriculum.seqlen(iteration)
            if seqlen != self.seqlen:
                self.engine.sequence_length_changed()
            self.seqlen = seqlen
        loss = self.engine.train_step(
            batches, inject=iteration in self.inject and self.engine.inject_here,
            measure_norm=iteration % self.cfg.logging.log_interval == 0)
        return loss, self.guard.end_step()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, it: Iterator[dict[str, torch.Tensor]] | None, name: str) -> float | None:
        if it is None:
            return None
        eng, t = self.engine, self.cfg.training
        eng.eval()
        counts = [0.0, 0.0]  # tokens, characters (char_level_ppl)
        if self.cfg.logging.char_level_ppl:
            it = self._count_chars(it, counts)
        batches = self._micro_batches(it)
        losses: list[float] = []
        for _ in range(t.eval_iters):
            losses += eng.eval_losses(batches)
        eng.train()
        loss = eng.mean_loss(sum(losses) / max(1, len(losses)))
        if name == "validation":
            self.progress.consumed_valid_samples += t.eval_iters * (t.train_batch_size or 0)
        extra = eng.take_metrics("eval")
        if self.cfg.logging.char_level_ppl:
            extra = {**extra, "lm_loss_char_lvl_ppl": self._char_level_ppl(loss, counts)}
        self.metrics.log_eval(self.progress.iteration, loss, split=name, extra=extra)
        return loss

    def _count_chars(self, it: Iterator[dict[str, torch.Tensor]], counts: list[float]
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """Pass the evaluation batches through, counting their tokens and the characters
        they detokenize to."""
        for raw in it:
            for row in raw["text"]:
                ids = row.tolist()
                counts[0] += len(ids)
                counts[1] += len(self.tokenizer.detokenize(ids))
            yield raw

    def _char_level_ppl(self, loss: float, counts: list[float]) -> float:
        """GPT-NeoX's character-level perplexity: exp(loss x tokens per character), the
        counts summed over the data-parallel replicas."""
        totals = torch.tensor(counts, dtype=torch.float64)
        group = self.rt.state.dp_group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(totals, group=group)
        tokens, chars = totals.tolist()
        exponent = loss * tokens / max(1.0, chars)
        return math.exp(exponent) if exponent < 700 else math.inf

    # ------------------------------------------------------------------ the loop
    def train(self, train_set: Any, valid_set: Any) -> str:
        """Run to train_iters; returns why it stopped."""
        cfg, p, t = self.cfg, self.progress, self.cfg.training
        if p.iteration >= self.budget.train_iters or not t.do_train:
            return "done"
        train_it = iter(loader(train_set, cfg, self.rt.state, p.consumed_train_samples))
        batches = self._micro_batches(train_it, training=True)
        valid_it = cycle_from(valid_set, cfg, self.rt.state, p.consumed_valid_samples) \
            if t.do_valid else None
        self.engine.train()
        if p.iteration == 0 and 0 in (cfg.checkpoint.extra_save_iters or ()):
            self.save()  # the initial weights (Pythia-style step 0 checkpoint)
        p.interval_start, p.interval_iters = time.time(), 0
        lg = cfg.logging
        profiler = StepProfiler(
            start=lg.profile_step_start, stop=lg.profile_step_stop, rank=self.rt.state.rank,
            directory=trace_dir(lg.tensorboard_dir, lg.log_dir) or ".",
            resumed_at=p.iteration) if lg.profile else None
        try:
            return self._steps(batches, valid_it, profiler)
        finally:
            if profiler is not None:
                profiler.close()

    def _steps(self, batches: Iterator[LMBatch], valid_it: Any,
               profiler: StepProfiler | None) -> str:
        cfg, p, t = self.cfg, self.progress, self.cfg.training
        reason = "done"
        while p.iteration < self.budget.train_iters:
            if self.stop_requested():
                return "signal"
            with profiler.step(p.iteration + 1) if profiler is not None \
                    else contextlib.nullcontext():
                loss, skipped = self.train_step(batches)
            p.iteration += 1
            if self.memory is not None:
                self.memory.after_step(p.iteration)
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
            self.poll_saves()
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

    def stop_requested(self) -> bool:
        """At a step boundary: did a stop signal reach any rank? If so, every rank saves a
        checkpoint here (unless this is the iteration just loaded) and rank 0 prints one line,
        on stderr where deepy.py reads it, naming the signal and the checkpoint."""
        if not self.cfg.training.save_on_signal:
            return False
        signum = int(world_max([float(self.stop.received or 0)])[0])
        if not signum:
            return False
        it, save_dir = self.progress.iteration, self.cfg.checkpoint.save
        name = signal.Signals(signum).name
        self.metrics.info(f"stop requested by a signal ({name}): saving at iteration {it}")
        if self.loaded_iteration == it and self.cfg.checkpoint.load:
            where = f"checkpoint: {Path(self.cfg.checkpoint.load) / f'global_step{it}'} " \
                "(loaded by this run; nothing new to save)"
        elif save_dir:
            if self.saved_iteration != it:  # not saved on schedule at this boundary already
                self.save()
            self.finish_saves()  # an async write completes before the process ends
            where = f"checkpoint: {Path(save_dir) / f'global_step{it}'}"
        else:
            where = "no checkpoint written (`save` is not set)"
        if self.rt.state.rank == 0:
            print(f"{STOP_LINE} {name} at iteration {it}; {where}", file=sys.stderr, flush=True)
        return True

    def log_training(self) -> None:
        p, eng = self.progress, self.engine
        elapsed = time.time() - p.interval_start
        loss = eng.mean_loss(p.loss_sum / p.loss_count if p.loss_count else float("nan"))
        stats = eng.take_stats()
        noise = {"noise_scale": stats.pop("noise_scale")} if "noise_scale" in stats else {}
        self.metrics.log_train(
            p.iteration, lm_loss=loss, lr=eng.scheduler.get_lr(), grad_norm=eng.grad_norm(),
            loss_scale=eng.loss_scale(), step_time_s=elapsed / max(1, p.interval_iters),
            skipped_iters=p.skipped_iters, consumed_samples=p.consumed_train_samples,
            elapsed_s=time.time() - self.started,
            extra={**eng.take_metrics(), **eng.moe_metrics(), **noise,
                   **({"curriculum_seqlen": self.seqlen} if self.seqlen is not None else {})}
            or None,
        )
        self.metrics.log_stats(p.iteration, stats)
        if self.cfg.ds.wall_clock_breakdown:
            self.metrics.info(eng.timers.breakdown_line(normalizer=max(1, p.interval_iters)))
        p.loss_sum, p.loss_count, p.interval_iters = 0.0, 0, 0
        p.interval_start = time.time()


def train(argv: list[str] | None = None, stop: StopSignal | None = None) -> int:
    """One training run. ``stop`` is the signal recorder ``train.py`` installs before its
    imports (one is installed here otherwise)."""
    stop = stop if stop is not None else StopSignal()
    rt = start(argv, purpose="train")
    budget = sample_budget(rt.cfg)
    # train_epochs decides the length once the data is known; from here on one config says it
    rt = rt.with_cfg(rt.cfg.replace_section("training", train_iters=budget.train_iters))
    from megatron.training.metrics_setup import build_metrics

    metrics = build_metrics(rt)
    lg = rt.cfg.logging
    memory = MemorySnapshot(path=lg.memory_profiling_path or ".", stop=lg.profile_step_stop,
                            rank=rt.rank) if lg.memory_profiling else None
    engine = build_engine(rt)
    trainer = Trainer(rt, engine, budget, metrics, stop)
    trainer.memory = memory
    trainer.load()
    engine.start(trainer.resumed_state)
    train_set, valid_set, test_set = build_datasets(rt.cfg, budget)
    try:
        reason = trainer.train(train_set, valid_set)
        if reason == "done" and rt.cfg.training.do_test and test_set is not None:
            trainer.evaluate(cycle_from(test_set, rt.cfg, rt.state, 0), "test")
        trainer.finish_saves()
    finally:
        if sys.exc_info()[0] is not None:  # an error ends the run: the save in flight completes
            with contextlib.suppress(Exception):
                trainer.finish_saves()
        trainer.stop.release()
        metrics.close()
    accelerator.synchronize()
    return 0
