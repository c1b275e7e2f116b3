"""MetricsLogger: stdout line, metrics.jsonl, run.log, TensorBoard and offline W&B."""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from megatron.logging.metrics import MetricsLogger, Throughput, WandbSettings, header_lines
from megatron.model_size import flops_per_token
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

REQUIRED = {"iteration", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "tflops",
            "mfu", "skipped_iters"}

THROUGHPUT = Throughput(train_iters=100, tokens_per_iter=1000, flops_per_token=1.5e9,
                        model_flops_per_token=1e9, num_devices=2, peak_tflops=10.0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_and_eval_records(tmp_path: Path) -> None:
    out = io.StringIO()
    with MetricsLogger(rank=0, log_dir=tmp_path, throughput=THROUGHPUT, stream=out) as logger:
        logger.write_header(["model: 2 layers", "device: cpu"])
        logger.log_train(10, lm_loss=5.25, lr=1e-3, step_time_s=0.5, grad_norm=1.5,
                         skipped_iters=1, loss_scale=65536.0, consumed_samples=80,
                         elapsed_s=5.0)
        logger.log_train(20, lm_loss=4.75, lr=9e-4, step_time_s=0.25)
        logger.log_eval(20, 4.5)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["type"] for r in records] == ["train", "train", "eval"]
    first, second, ev = records
    assert REQUIRED <= set(first)
    assert first["iteration"] == 10 and first["lm_loss"] == 5.25 and first["lr"] == 1e-3
    assert first["grad_norm"] == 1.5 and first["skipped_iters"] == 1
    assert first["tokens_per_sec"] == pytest.approx(2000.0)  # 1000 tokens / 0.5 s
    # hardware FLOPs per device: 2000 * 1.5e9 / 2 devices = 1.5 TFLOP/s
    assert first["tflops"] == pytest.approx(1.5)
    # MFU from model FLOPs: 2000 * 1e9 / 2 / 1e12 = 1 TFLOP/s of a 10 TFLOP/s peak
    assert first["mfu"] == pytest.approx(0.1)
    assert first["eta_s"] == pytest.approx(90 * 0.5)
    assert (first["loss_scale"], first["consumed_samples"], first["elapsed_s"]) == \
        (65536.0, 80, 5.0)
    assert REQUIRED <= set(second) and second["grad_norm"] is None
    assert "loss_scale" not in second and second["tokens_per_sec"] == pytest.approx(4000.0)
    assert ev["split"] == "validation" and ev["iteration"] == 20
    assert ev["eval_loss"] == 4.5 and ev["eval_ppl"] == pytest.approx(math.exp(4.5))

    lines = out.getvalue().splitlines()
    train_lines = [ln for ln in lines if ln.startswith("iteration ")]
    assert len(train_lines) == 2
    assert train_lines[0].startswith("iteration 10/100 | lr 1.000E-03 | lm_loss 5.2500E+00")
    for field in ("grad_norm 1.500E+00", "loss_scale 65536", "samples 80", "tokens/s 2000",
                  "TFLOP/s 1.50", "MFU 10.00%", "step 0.500s", "ETA 0:00:45", "skipped 1"):
        assert field in train_lines[0]
    assert "grad_norm n/a" in train_lines[1]
    assert any(ln.startswith("validation | iteration 20 | eval_loss 4.5000E+00") for ln in lines)
    run_log = (tmp_path / "run.log").read_text()
    assert "model: 2 layers" in run_log and train_lines[1] in run_log


def test_resume_appends(tmp_path: Path) -> None:
    for it in (10, 20):
        with MetricsLogger(rank=0, log_dir=tmp_path, stream=io.StringIO()) as logger:
            logger.log_train(it, lm_loss=3.0, lr=1e-4, step_time_s=1.0)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [10, 20]
    # without throughput facts the derived numbers are unknown, not invented
    assert records[0]["tokens_per_sec"] is None and records[0]["mfu"] is None


def test_non_finite_values_are_null_in_json_but_visible_on_stdout(tmp_path: Path) -> None:
    out = io.StringIO()
    with MetricsLogger(rank=0, log_dir=tmp_path, throughput=THROUGHPUT, stream=out) as logger:
        logger.log_train(5, lm_loss=float("nan"), lr=1e-3, step_time_s=0.5,
                         grad_norm=float("inf"))
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["lm_loss"] is None and record["grad_norm"] is None
    assert "lm_loss NAN" in out.getvalue() and "grad_norm INF" in out.getvalue()


def test_mfu_not_available_without_peak(tmp_path: Path) -> None:
    tp = Throughput(train_iters=10, tokens_per_iter=100, flops_per_token=1e6)
    out = io.StringIO()
    with MetricsLogger(rank=0, log_dir=tmp_path, throughput=tp, stream=out) as logger:
        record = logger.log_train(1, lm_loss=2.0, lr=1e-3, step_time_s=0.1)
    assert record is not None and record["mfu"] is None and record["tflops"] is not None
    assert "MFU n/a" in out.getvalue()


def test_only_the_writing_rank_writes(tmp_path: Path) -> None:
    out = io.StringIO()
    logger = MetricsLogger(rank=1, log_dir=tmp_path / "logs", tensorboard_dir=tmp_path / "tb",
                           throughput=THROUGHPUT, stream=out)
    assert logger.log_train(1, lm_loss=2.0, lr=1e-3, step_time_s=0.1) is None
    logger.write_header(["x"])
    logger.close()
    assert not (tmp_path / "logs").exists() and not (tmp_path / "tb").exists()
    assert out.getvalue() == ""
    last = MetricsLogger(rank=3, writer_rank=3, log_dir=tmp_path / "logs", stream=out)
    last.log_train(1, lm_loss=2.0, lr=1e-3, step_time_s=0.1)
    last.close()
    assert len(read_jsonl(tmp_path / "logs" / "metrics.jsonl")) == 1


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    with MetricsLogger(rank=0, log_dir=None, tensorboard_dir=tb, throughput=THROUGHPUT,
                       stream=io.StringIO()) as logger:
        logger.log_train(10, lm_loss=5.0, lr=1e-3, step_time_s=0.5, grad_norm=2.0)
        logger.log_train(20, lm_loss=4.0, lr=5e-4, step_time_s=0.5, grad_norm=1.0)
        logger.log_eval(20, 3.5)
        logger.log_eval(20, 3.75, split="test")
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/lm_loss", "train/lr", "train/grad_norm", "train/tokens_per_sec",
            "train/tflops", "train/mfu", "train/step_time_s", "train/skipped_iters",
            "eval/loss", "eval/ppl", "test/loss"} <= tags
    loss = [(e.step, e.value) for e in acc.Scalars("train/lm_loss")]
    assert loss == [(10, 5.0), (20, 4.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(20, 3.5)]
    assert acc.Scalars("train/lr")[1].value == pytest.approx(5e-4)
    assert acc.Scalars("test/loss")[0].value == pytest.approx(3.75)


def _wandb_records(path: Path) -> list[Any]:
    """Decode a W&B transaction log (.wandb): a 7-byte file header, then LevelDB-style
    records (crc32, uint16 length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB
    blocks, each payload a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block tail too small for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_dir = tmp_path / "logs"
    settings = WandbSettings(project="tests", group="g", run_name="offline-check",
                             config={"hidden_size": 32})
    with MetricsLogger(rank=0, log_dir=log_dir, wandb=settings, throughput=THROUGHPUT,
                       stream=io.StringIO()) as logger:
        logger.log_train(10, lm_loss=5.5, lr=1e-3, step_time_s=0.5)
        logger.log_eval(10, 4.25)
    import wandb

    # finish() hands the records to W&B's service process, which writes the transaction log
    # asynchronously; shutting the service down (as interpreter exit does) completes the file.
    wandb.teardown()
    runs = list((log_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # the run directory lands in the log dir
    (wandb_file,) = runs[0].glob("run-*.wandb")
    assert wandb_file.stat().st_size > 0
    history: dict[str, tuple[int, Any]] = {}
    summary: dict[str, Any] = {}
    runs_seen = []
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history[key] = (step, json.loads(item.value_json))
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            runs_seen.append(record.run)
    assert history["train/lm_loss"] == (10, 5.5)
    assert history["eval/loss"] == (10, 4.25)
    assert history["train/tokens_per_sec"][1] == pytest.approx(2000.0)
    assert summary["train/lm_loss"] == 5.5
    (run,) = runs_seen
    assert (run.project, run.run_group, run.display_name) == ("tests", "g", "offline-check")
    assert "hidden_size" in {item.key for item in run.config.update}


def test_wandb_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(RuntimeError, match="wandb package is not installed"):
        MetricsLogger(rank=0, log_dir=tmp_path, wandb=WandbSettings())


def test_from_config_and_header(tmp_path: Path) -> None:
    values = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
        "train_iters": 100, "data_path": "x", "tokenizer_type": "CharLevelTokenizer",
        "optimizer": {"type": "Lion", "params": {"lr": 1e-3}}, "checkpoint_activations": True,
        "log_dir": str(tmp_path / "logs"), "tensorboard_dir": str(tmp_path / "tb"),
    }
    cfg = resolve_config(merge_configs([("t.yml", values)]),
                         RunFacts(world_size=1, launching=False)).with_vocab_size(100)
    vocab = cfg.tokenizer.padded_vocab_size
    assert vocab == 128
    logger, source = MetricsLogger.from_config(cfg, rank=0, device_name="NVIDIA A100-SXM4-80GB",
                                               stream=io.StringIO())
    tp = logger.throughput
    assert tp is not None and tp.peak_tflops == 312.0 and "A100" in source
    assert tp.tokens_per_iter == 6 * 16 and tp.train_iters == 100 and tp.num_devices == 1
    assert tp.flops_per_token == flops_per_token(cfg.model, vocab, recompute=True)
    assert tp.model_flops_per_token == flops_per_token(cfg.model, vocab, recompute=False)
    lines = header_lines(cfg, device_name="NVIDIA A100-SXM4-80GB", peak_source=source)
    logger.write_header(lines)
    logger.close()
    run_log = (tmp_path / "logs" / "run.log").read_text()
    assert "device: NVIDIA A100-SXM4-80GB" in run_log and "peak FLOP/s: NVIDIA A100" in run_log
    assert "optimizer Lion" in run_log
    assert list((tmp_path / "tb").iterdir())  # the TensorBoard writer was created
    cfg = cfg.replace_section("training", peak_theoretical_tflops=50.0)
    logger, source = MetricsLogger.from_config(cfg, rank=0, device_name="cpu",
                                               stream=io.StringIO())
    assert logger.throughput is not None and logger.throughput.peak_tflops == 50.0
    assert "config" in source
    logger.close()


def test_wandb_keys_reach_the_wandb_settings() -> None:
    from megatron.neox_arguments.groups_io import LoggingArgs

    assert WandbSettings.from_logging_args(LoggingArgs()) is None  # use_wandb off
    args = LoggingArgs(use_wandb=True, wandb_project="p", wandb_group="g", wandb_team="t",
                       wandb_host="http://localhost:1", wandb_run_name="r",
                       wandb_init_all_ranks=True)
    s = WandbSettings.from_logging_args(args, config={"a": 1})
    assert s is not None
    assert (s.project, s.group, s.team, s.host, s.run_name, s.init_all_ranks) == \
        ("p", "g", "t", "http://localhost:1", "r", True)
    assert s.config == {"a": 1}
