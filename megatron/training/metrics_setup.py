"""The run's metrics logger, with the run header written first."""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron import accelerator
from megatron.logging.metrics import MetricsLogger, header_lines
from megatron.neox_arguments import NeoXConfig
from megatron.training.data_setup import SampleBudget
from megatron.training.runtime import Runtime


def build_metrics(cfg: NeoXConfig, rt: Runtime, budget: SampleBudget) -> Any:
    if cfg.training.train_iters != budget.train_iters:  # train_epochs decided the length
        cfg = cfg.replace_section("training", train_iters=budget.train_iters)
    logger, peak_source = MetricsLogger.from_config(cfg, rank=rt.rank)
    logger.write_header(header_lines(cfg, device_name=accelerator.device_name(),
                                     peak_source=peak_source))
    logger.throughput = dataclasses.replace(logger.throughput, train_iters=budget.train_iters) \
        if logger.throughput is not None else None
    return logger
