"""The run's metrics logger, with the run header written first."""

from __future__ import annotations

from typing import Any

from megatron import accelerator
from megatron.logging.metrics import MetricsLogger, header_lines
from megatron.runtime import Runtime


def build_metrics(rt: Runtime) -> Any:
    """The metrics logger of ``rt.cfg`` (whose ``train_iters`` is decided), header written."""
    logger, peak_source = MetricsLogger.from_config(rt.cfg, rank=rt.rank)
    logger.write_header(header_lines(rt.cfg, device_name=accelerator.device_name(),
                                     peak_source=peak_source))
    return logger
