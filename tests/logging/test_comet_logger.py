"""Comet logging (``use_comet``, ``comet_*``): an offline experiment archive with the same scalars
TensorBoard and W&B get, the experiment's name, tags and metadata; Comet refusing to start
(online without an API key) is one line."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from megatron.logging.comet import CometSettings
from megatron.logging.metrics import MetricsLogger
from megatron.neox_arguments import ConfigError, RunFacts, merge_configs, resolve_config


def read_comet_archive(directory: Path) -> tuple[dict, list[dict]]:
    """The experiment description and the messages of the one offline archive in a folder."""
    (archive,) = directory.glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        experiment = json.loads(z.read("experiment.json"))
        messages = [json.loads(line) for line in z.read("messages.json").splitlines() if line]
    return experiment, messages


def comet_metrics(messages: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for m in messages:
        if m["type"] == "metric_msg":
            metric = m["payload"]["metric"]
            out.setdefault(metric["metricName"], {})[metric["step"]] = metric["metricValue"]
    return out


def test_offline_experiment_archive_holds_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.delenv("COMET_OFFLINE_DIRECTORY", raising=False)
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "")  # restored after the test
    monkeypatch.delenv("COMET_ERROR_TRACKING_ENABLE")  # offline turns Comet's reports off
    cfg = resolve_config(merge_configs([("c.yml", {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "train_micro_batch_size_per_gpu": 1,
        "use_comet": True, "comet_workspace": "team-a", "comet_project": "tests",
        "comet_experiment_name": "offline-check", "comet_tags": ["tiny", "cpu"],
        "comet_others": {"cluster": "local"}})]), RunFacts(purpose=None, launching=False))
    settings = CometSettings.from_logging_args(cfg.logging, cfg.flat())
    assert settings is not None
    assert CometSettings.from_logging_args(dataclasses.replace(cfg.logging, use_comet=False)) \
        is None
    with MetricsLogger(rank=0, log_dir=tmp_path / "logs", comet=settings,
                       stream=io.StringIO()) as logger:
        logger.log_train(10, lm_loss=5.5, lr=1e-3, step_time_s=0.5)
        logger.log_eval(10, 4.25)
    assert os.environ["COMET_ERROR_TRACKING_ENABLE"] == "false"
    experiment, messages = read_comet_archive(tmp_path / "logs" / "comet")
    metrics = comet_metrics(messages)
    assert metrics["train/lm_loss"] == {10: 5.5} and metrics["train/lr"] == {10: 0.001}
    assert metrics["eval/loss"] == {10: 4.25}
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages
              if m["type"] == "log_other"}
    assert others["Name"] == "offline-check" and others["cluster"] == "local"
    params = {(m["payload"].get("param") or m["payload"]["params"])["paramName"]
              for m in messages if m["type"] == "parameter_msg"}
    assert "hidden_size" in params and "comet_project" in params and "config_files" not in params
    assert experiment["project_name"] == "tests" and experiment["workspace"] == "team-a"
    assert set(experiment["tags"]) == {"tiny", "cpu"}
    # a rank other than the writing rank starts no experiment
    with MetricsLogger(rank=1, log_dir=tmp_path / "r1", comet=settings) as other:
        other.log_train(1, lm_loss=1.0, lr=1e-3, step_time_s=0.1)
    assert not (tmp_path / "r1").exists()


def test_online_without_api_key_is_one_line(tmp_path, monkeypatch):
    for name in ("COMET_START_ONLINE", "COMET_API_KEY", "COMET_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # no report of the failure
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.comet.config
    with pytest.raises(ConfigError) as info:
        MetricsLogger(rank=0, log_dir=None, comet=CometSettings(project="p"))
    message = str(info.value)
    assert message.startswith("use_comet: Comet did not start an experiment (")
    assert "COMET_API_KEY" in message and "\n" not in message
