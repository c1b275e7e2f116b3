"""Comet experiment tracking (``use_comet`` and the ``comet_*`` keys).

The writing rank starts one experiment with ``comet_ml.start``: online with ``COMET_API_KEY``,
or offline (``COMET_START_ONLINE=false``), where Comet writes a zip archive (``comet upload``
sends it later) to ``COMET_OFFLINE_DIRECTORY``, or else to ``<log_dir>/comet``. It receives
the scalars TensorBoard and W&B get, under the same names (``train/lm_loss``, ``eval/loss``,
...) at the same steps, and the resolved config as its parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.neox_arguments.fields import ConfigError

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_io import LoggingArgs


@dataclass(frozen=True)
class CometSettings:
    workspace: str | None = None
    project: str | None = None
    experiment_name: str | None = None
    tags: tuple[str, ...] = ()
    others: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None  # logged as the experiment's parameters

    @classmethod
    def from_logging_args(cls, args: LoggingArgs,
                          config: Mapping[str, Any] | None = None) -> CometSettings | None:
        """The settings of the config's ``comet_*`` keys; None unless ``use_comet``."""
        if not args.use_comet:
            return None
        return cls(workspace=args.comet_workspace, project=args.comet_project,
                   experiment_name=args.comet_experiment_name,
                   tags=tuple(str(t) for t in args.comet_tags or ()),
                   others=args.comet_others, config=config)


def _import_comet() -> Any:
    try:
        import comet_ml
    except ImportError:
        raise ConfigError("use_comet is set but the comet_ml package is not installed "
                           "(pip install comet_ml), or set use_comet: false") from None
    return comet_ml


def start_experiment(settings: CometSettings, log_dir: Path | None) -> Any:
    """A started Comet experiment; a one-line ConfigError (the run ends with that line) when
    Comet refuses to start."""
    if os.environ.get("COMET_START_ONLINE", "").lower() in ("0", "false", "no"):
        # offline means nothing leaves the machine: Comet's own error reports included
        os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    comet_ml = _import_comet()
    offline_dir = None
    if "COMET_OFFLINE_DIRECTORY" not in os.environ and log_dir is not None:
        target = (log_dir / "comet").resolve()  # Comet refuses relative paths
        target.mkdir(parents=True, exist_ok=True)
        offline_dir = str(target)
    experiment_config = comet_ml.ExperimentConfig(
        name=settings.experiment_name, tags=list(settings.tags) or None,
        offline_directory=offline_dir, parse_args=False, log_code=False, log_graph=False,
        auto_metric_logging=False, auto_param_logging=False, auto_output_logging=None,
        display_summary_level=0)
    try:
        experiment = comet_ml.start(workspace=settings.workspace, project=settings.project,
                                    experiment_config=experiment_config)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"use_comet: Comet did not start an experiment ({first}); set "
                           "COMET_API_KEY, or COMET_START_ONLINE=false for an offline "
                           "archive") from None
    if settings.others:
        experiment.log_others(dict(settings.others))
    if settings.config:
        experiment.log_parameters({k: v for k, v in settings.config.items()
                                   if v is not None and k != "config_files"})
    return experiment
