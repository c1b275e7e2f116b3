"""Training and evaluation metrics: stdout, ``metrics.jsonl``, TensorBoard, Weights & Biases and
Comet.

One :class:`MetricsLogger` per rank; only the writing rank (``writer_rank``, rank 0 by default)
writes anything, except that with ``wandb_init_all_ranks`` every rank logs to its own W&B run.

Per training log call:

* one grep-friendly stdout line (also appended to ``<log_dir>/run.log``)::

    iteration 20/100 | lr 1.000E-03 | lm_loss 4.1234E+00 | grad_norm 1.102E+00 | ...

* one JSON line appended to ``<log_dir>/metrics.jsonl`` (never truncated, so a resumed run
  continues the file) with ``type: "train"``, ``iteration``, ``lm_loss``, ``lr``, ``grad_norm``,
  ``tokens_per_sec``, ``step_time_s``, ``tflops``, ``mfu``, ``skipped_iters``, ``eta_s``, ``time``
  and, when given, ``loss_scale``, ``consumed_samples``, ``elapsed_s`` and any extra scalars.
  Unknown or non-finite values are ``null``;
* the same scalars to TensorBoard as ``train/<name>`` at step ``iteration``;
* and to W&B (``use_wandb``) and Comet (``use_comet``, :mod:`megatron.logging.comet`) under the
  same names.

Evaluation results go the same ways as ``eval_loss``/``eval_ppl`` (TensorBoard/W&B:
``eval/loss``, ``eval/ppl`` for the validation split, ``<split>/loss``, ``<split>/ppl`` for
others).
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from megatron.logging.comet import CometSettings, start_experiment
from megatron.logging.mfu import achieved_tflops, mfu, peak_tflops

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig
    from megatron.neox_arguments.groups_io import LoggingArgs

METRICS_FILE = "metrics.jsonl"
RUN_LOG_FILE = "run.log"


@dataclass(frozen=True)
class WandbSettings:
    project: str = "neox"
    group: str | None = None
    team: str | None = None
    host: str | None = None
    run_name: str | None = None
    init_all_ranks: bool = False
    config: Mapping[str, Any] | None = None  # recorded as the W&B run config

    @classmethod
    def from_logging_args(cls, args: LoggingArgs,
                          config: Mapping[str, Any] | None = None) -> WandbSettings | None:
        """The settings of the config's ``wandb_*`` keys; None unless ``use_wandb``."""
        if not args.use_wandb:
            return None
        return cls(project=args.wandb_project, group=args.wandb_group, team=args.wandb_team,
                   host=args.wandb_host, run_name=args.wandb_run_name,
                   init_all_ranks=args.wandb_init_all_ranks, config=config)


@dataclass(frozen=True)
class Throughput:
    """What turns a step time into tokens/s, TFLOP/s, MFU and an ETA."""

    train_iters: int
    tokens_per_iter: int  # global batch x sequence length
    flops_per_token: float  # hardware FLOPs, recomputation included: gives TFLOP/s
    num_devices: int = 1
    peak_tflops: float | None = None  # dense peak of one device; None: MFU n/a
    model_flops_per_token: float | None = None  # without recomputation, for MFU (default: ^)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(value: Any, spec: str) -> str:
    """Display form of a value: n/a when unknown; NAN/INF stay visible on the stdout line."""
    return "n/a" if value is None else format(float(value), spec)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return str(datetime.timedelta(seconds=round(seconds)))


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise RuntimeError("use_wandb is set but the wandb package is not installed "
                           "(pip install wandb), or set use_wandb: false") from None
    return wandb


class MetricsLogger:
    """Writes metrics on the writing rank; a no-op elsewhere (see the module docstring)."""

    def __init__(self, *, rank: int, log_dir: str | os.PathLike[str] | None,
                 tensorboard_dir: str | os.PathLike[str] | None = None,
                 wandb: WandbSettings | None = None, throughput: Throughput | None = None,
                 writer_rank: int = 0, stream: TextIO | None = None,
                 comet: CometSettings | None = None) -> None:
        self.rank = rank
        self.is_writer = rank == writer_rank
        self.throughput = throughput
        self._stream = stream
        self._closed = False
        self._jsonl: TextIO | None = None
        self._run_log: TextIO | None = None
        self._tb: Any = None
        self._wandb_run: Any = None
        self._comet: Any = None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        if self.is_writer and self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / METRICS_FILE, "a", buffering=1, encoding="utf-8")
            self._run_log = open(self.log_dir / RUN_LOG_FILE, "a", buffering=1, encoding="utf-8")
        if self.is_writer and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))
        if wandb is not None and (self.is_writer or wandb.init_all_ranks):
            self._wandb_run = self._start_wandb(wandb)
        if comet is not None and self.is_writer:
            self._comet = start_experiment(comet, self.log_dir)
        atexit.register(self.close)

    # ---------------------------------------------------------------------------- setup

    def _start_wandb(self, settings: WandbSettings) -> Any:
        wandb = _import_wandb()
        run_dir = self.log_dir or Path(os.environ.get("WANDB_DIR", "."))
        run_dir.mkdir(parents=True, exist_ok=True)
        name = settings.run_name
        if settings.init_all_ranks:  # one run per rank: tell them apart
            name = f"{name}-rank-{self.rank}" if name else f"rank-{self.rank}"
        kwargs: dict[str, Any] = {
            "project": settings.project, "group": settings.group, "entity": settings.team,
            "name": name, "dir": str(run_dir), "config": dict(settings.config or {}),
        }
        if settings.host:
            kwargs["settings"] = wandb.Settings(base_url=settings.host)
        return wandb.init(**kwargs)

    @classmethod
    def from_config(cls, cfg: NeoXConfig, *, rank: int, writer_rank: int = 0,
                    device_name: str | None = None,
                    stream: TextIO | None = None) -> tuple[MetricsLogger, str]:
        """A logger for a resolved config (its padded vocabulary must be known); returns it
        with the description of where the peak FLOP/s come from (for the run header)."""
        from megatron import accelerator
        from megatron.model_size import flops_per_token

        vocab = cfg.tokenizer.padded_vocab_size
        if vocab is None:
            raise ValueError("padded_vocab_size is unknown; call cfg.with_vocab_size first")
        name = device_name if device_name is not None else accelerator.device_name()
        peak, source = peak_tflops(name, cfg.training.peak_theoretical_tflops)
        t = cfg.training
        throughput = Throughput(
            train_iters=t.train_iters or 0,
            tokens_per_iter=(t.train_batch_size or 0) * (cfg.model.seq_length or 0),
            flops_per_token=flops_per_token(
                cfg.model, vocab, recompute=cfg.act_ckpt.checkpoint_activations),
            model_flops_per_token=flops_per_token(cfg.model, vocab, recompute=False),
            num_devices=cfg.parallelism.world_size,
            peak_tflops=peak,
        )
        lg = cfg.logging
        logger = cls(rank=rank, log_dir=lg.log_dir, tensorboard_dir=lg.tensorboard_dir,
                     wandb=WandbSettings.from_logging_args(lg, cfg.flat()),
                     throughput=throughput, writer_rank=writer_rank, stream=stream,
                     comet=CometSettings.from_logging_args(lg, cfg.flat()))
        return logger, source

    # ---------------------------------------------------------------------------- output

    def _print(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)
        if self._run_log is not None:
            self._run_log.write(line + "\n")

    def _write_record(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

    def _scalars(self, prefix: str, values: Mapping[str, float | None], step: int) -> None:
        tagged = {f"{prefix}/{k}": v for k, v in values.items() if v is not None}
        if self._tb is not None and self.is_writer:
            for tag, value in tagged.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None and tagged:
            self._wandb_run.log(tagged, step=step)
        if self._comet is not None and tagged:
            self._comet.log_metrics(tagged, step=step)

    def info(self, message: str) -> None:
        """A plain message (checkpoint saved, stop requested, ...) on the writing rank."""
        if self.is_writer:
            self._print(message)

    def write_header(self, lines: Iterable[str]) -> None:
        """Run header (config summary, device, peak-FLOPs source) to stdout and run.log."""
        if not self.is_writer:
            return
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        self._print(f"==== run started {stamp} ====")
        for line in lines:
            self._print(line)

    def log_train(self, iteration: int, *, lm_loss: float | None, lr: float,
                  step_time_s: float, grad_norm: float | None = None,
                  skipped_iters: int = 0, loss_scale: float | None = None,
                  consumed_samples: int | None = None, elapsed_s: float | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Log one training interval. ``step_time_s`` is the mean time of one iteration over
        the interval; ``skipped_iters`` the optimizer steps skipped in it. Returns the JSON
        record (None on a non-writing rank)."""
        tp = self.throughput
        tokens_per_sec = tflops = util = eta = None
        if tp is not None and step_time_s > 0:
            tokens_per_sec = tp.tokens_per_iter / step_time_s
            tflops = achieved_tflops(tokens_per_sec, tp.flops_per_token, tp.num_devices)
            model_flops = tp.model_flops_per_token if tp.model_flops_per_token is not None \
                else tp.flops_per_token
            util = mfu(tokens_per_sec, model_flops, tp.peak_tflops, tp.num_devices)
            eta = max(0, tp.train_iters - iteration) * step_time_s
        values: dict[str, float | None] = {
            "lm_loss": _number(lm_loss), "lr": _number(lr), "grad_norm": _number(grad_norm),
            "tokens_per_sec": _number(tokens_per_sec), "step_time_s": _number(step_time_s),
            "tflops": _number(tflops), "mfu": _number(util),
            "skipped_iters": float(skipped_iters), "eta_s": _number(eta),
        }
        optional = {"loss_scale": loss_scale, "consumed_samples": consumed_samples,
                    "elapsed_s": elapsed_s, **(extra or {})}
        values.update({k: _number(v) for k, v in optional.items() if v is not None})
        self._scalars("train", values, iteration)
        if not self.is_writer:
            return None
        record: dict[str, Any] = {"type": "train", "iteration": iteration, **values,
                                  "skipped_iters": int(skipped_iters), "time": time.time()}
        if consumed_samples is not None:
            record["consumed_samples"] = int(consumed_samples)
        self._write_record(record)
        total = tp.train_iters if tp is not None else "?"
        parts = [
            f"iteration {iteration}/{total}",
            f"lr {_fmt(lr, '.3E')}",
            f"lm_loss {_fmt(lm_loss, '.4E')}",
            f"grad_norm {_fmt(grad_norm, '.3E')}",
        ]
        if loss_scale is not None:
            parts.append(f"loss_scale {float(loss_scale):g}")
        if consumed_samples is not None:
            parts.append(f"samples {int(consumed_samples)}")
        parts += [
            f"tokens/s {_fmt(tokens_per_sec, '.0f')}",
            f"TFLOP/s {_fmt(tflops, '.2f')}",
            f"MFU {'n/a' if util is None else format(100 * util, '.2f') + '%'}",
            f"step {step_time_s:.3f}s",
            f"ETA {_fmt_duration(eta)}",
            f"skipped {int(skipped_iters)}",
        ]
        self._print(" | ".join(parts))
        return record

    def log_stats(self, iteration: int, values: Mapping[str, float]) -> None:
        """Per-parameter statistics under their full tags (``parameter_norms/<name>``, ...):
        to TensorBoard/W&B, one ``type: "stats"`` JSON record and one run-log line."""
        if not values:
            return
        clean = {k: _number(v) for k, v in values.items()}
        if self._tb is not None and self.is_writer:
            for tag, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(tag, value, global_step=iteration)
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in clean.items() if v is not None},
                                step=iteration)
        if not self.is_writer:
            return
        self._write_record({"type": "stats", "iteration": iteration, **clean,
                            "time": time.time()})
        self._print(f"stats | iteration {iteration} | " + " | ".join(
            f"{k} {_fmt(v, '.4E')}" for k, v in clean.items()))

    def log_eval(self, iteration: int, loss: float, *, split: str = "validation",
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Log an evaluation result (mean LM loss over the evaluated batches)."""
        loss = float(loss)
        ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
        values: dict[str, float | None] = {"loss": _number(loss), "ppl": _number(ppl)}
        values.update({k: _number(v) for k, v in (extra or {}).items()})
        self._scalars("eval" if split == "validation" else split, values, iteration)
        if not self.is_writer:
            return None
        record = {"type": "eval", "iteration": iteration, "split": split,
                  "eval_loss": values.pop("loss"), "eval_ppl": values.pop("ppl"), **values,
                  "time": time.time()}
        self._write_record(record)
        self._print(f"{split} | iteration {iteration} | eval_loss {loss:.4E} | "
                    f"eval_ppl {_fmt(_number(ppl), '.4E')}")
        return record

    def flush(self) -> None:
        for f in (self._jsonl, self._run_log):
            if f is not None:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close everything (idempotent; also runs at interpreter exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for f in (self._jsonl, self._run_log):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        if self._comet is not None:
            self._comet.end()  # offline: writes the archive

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header_lines(cfg: NeoXConfig, *, device_name: str, peak_source: str) -> list[str]:
    """The run header: the config summary, the device and where the peak FLOP/s come from."""
    from megatron.neox_arguments.summary import summary_lines

    return [*summary_lines(cfg), f"device: {device_name}", f"peak FLOP/s: {peak_source}"]
