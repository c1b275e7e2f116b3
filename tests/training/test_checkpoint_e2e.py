"""Checkpoints through deepy.py: exact resume, pruning, a crash mid-save (stopping on a signal:
test_stop_signals.py)."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    losses,
    records,
    run_deepy,
    write_config,
)

from tests.s3_server import moto_s3_server, s3_env

pytestmark = pytest.mark.slow

TRAIN = {"train_iters": 6, "num_gpus": 2, "hidden_dropout": 0.1, "attention_dropout": 0.1,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.002}}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def s3():
    """An S3 server on loopback with a bucket ``ckpts``; yields boto3's environment for it."""
    with moto_s3_server() as endpoint:
        env = s3_env(endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="ckpts")
        yield env


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory, s3):
    """6 iterations in one go, saving every iteration and keeping the last 2; every save is
    also uploaded to the S3 server (s3_path)."""
    tmp = tmp_path_factory.mktemp("full")
    run = tmp / "run"
    cfg = write_config(tmp / "run.yml", base_values(
        corpus, run, save=str(run / "ckpt"), save_interval=1, keep_last_n_checkpoints=2,
        s3_path="s3://ckpts/neox", s3_chunk_size=5 * 1024 * 1024, **TRAIN))
    proc = run_deepy("configs/tiny_neox.yml", cfg, env=s3)
    assert proc.returncode == 0, explain(proc)
    return run


def test_every_save_is_uploaded_to_s3_path(uninterrupted, s3):
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"],
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket="ckpts", Prefix="neox/ckpt/") for o in page.get("Contents", [])]
    # every save went up, the ones pruned locally since (keep_last_n_checkpoints) included
    assert {k.split("/")[2] for k in keys} == {f"global_step{i}" for i in range(1, 7)}
    tag_dir = uninterrupted / "ckpt" / "global_step6"
    local = {p.relative_to(tag_dir).as_posix(): p for p in tag_dir.rglob("*") if p.is_file()}
    assert "manifest.json" in local and len(local) > 3
    assert {k for k in keys if k.startswith("neox/ckpt/global_step6/")} == \
        {f"neox/ckpt/global_step6/{name}" for name in local}
    for name, path in local.items():
        body = client.get_object(Bucket="ckpts", Key=f"neox/ckpt/global_step6/{name}")["Body"]
        assert body.read() == path.read_bytes(), name
    log = (uninterrupted / "logs" / "run.log").read_text()
    assert "uploaded checkpoint global_step6 to s3://ckpts/neox/ckpt/global_step6" in log


def test_keep_last_n_prunes_old_checkpoints(uninterrupted):
    ckpt = uninterrupted / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == \
        ["global_step5", "global_step6"]
    assert (ckpt / "latest").read_text() == "global_step6"
    manifest = json.loads((ckpt / "global_step6" / "manifest.json").read_text())
    assert manifest["iteration"] == 6
    assert "configs/merged.yml" in manifest["files"]
    assert any(name.startswith("rng/rank_") for name in manifest["files"])
    merged = (ckpt / "global_step6" / "configs" / "merged.yml").read_text()
    assert "hidden_dropout: 0.1" in merged


def test_damaged_checkpoint_is_a_one_line_error(corpus, tmp_path, uninterrupted):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted / "ckpt", ckpt)
    victim = next((ckpt / "global_step6").glob("mp_rank_00_model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    cfg = write_config(tmp_path / "r.yml", base_values(
        corpus, tmp_path / "run", load=str(ckpt), **TRAIN))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode != 0
    assert f"{victim}: damaged (100 bytes, the manifest says" in proc.stderr


def test_checkpoint_without_optimizer_state_resumes_with_a_fresh_optimizer(corpus, tmp_path):
    run = tmp_path / "run"
    values = base_values(corpus, run, save=str(run / "ckpt"), load=str(run / "ckpt"),
                         no_save_optim=True, **{**TRAIN, "num_gpus": 1, "train_iters": 3})
    first = run_deepy("configs/tiny_neox.yml",
                      write_config(tmp_path / "a.yml", {**values, "exit_interval": 2}))
    assert first.returncode == 0, explain(first)
    manifest = json.loads((run / "ckpt" / "global_step2" / "manifest.json").read_text())
    assert manifest["has_optimizer"] is False
    assert not any("optim_states" in name for name in manifest["files"])
    second = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "b.yml", values))
    assert second.returncode == 0, explain(second)
    assert "holds no optimizer state" in second.stdout and "(iteration 2)" in second.stdout
    assert max(losses(run)) == 3


def test_checkpoints_without_latest_are_never_overwritten(corpus, tmp_path, uninterrupted):
    """`latest` deleted (or the folder copied without it): the run stops with one line naming
    the checkpoints, exit status 2, and leaves every file as it was."""
    import shutil

    run = tmp_path / "run"
    ckpt = run / "ckpt"
    shutil.copytree(uninterrupted / "ckpt", ckpt)
    (ckpt / "latest").unlink()
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    values = base_values(corpus, run, save=str(ckpt), load=str(ckpt), save_interval=1, **TRAIN)
    proc = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "a.yml", values))
    assert proc.returncode == 2, explain(proc)
    assert f"{ckpt}: holds global_step5, global_step6 but no 'latest' file; the newest " \
           "complete one is global_step6" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before


def test_resume_with_a_longer_schedule_is_a_one_line_error(corpus, tmp_path, uninterrupted):
    """train_iters grew: the checkpoint's LR schedule (decay over 6 iterations) no longer
    matches the config's; the run stops with the scheduler's advice, no traceback."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(uninterrupted / "ckpt", ckpt)
    cfg = write_config(tmp_path / "r.yml", base_values(
        corpus, tmp_path / "run", load=str(ckpt), **{**TRAIN, "train_iters": 12}))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{ckpt}: iteration 6: lr scheduler: the checkpoint has" in proc.stderr
    assert "override_lr_scheduler" in proc.stderr


def test_async_saves_crash_mid_write_and_resume_with_equal_losses(corpus, tmp_path,
                                                                  uninterrupted):
    """2 ranks, async_save: rank 0 is killed in the background write of iteration 4 (files
    written, manifest not); latest still names global_step2, the resume continues from it
    with the uninterrupted run's losses, and each save logs one line with both times."""
    run = tmp_path / "run"
    values = base_values(corpus, run, save=str(run / "ckpt"), load=str(run / "ckpt"),
                         save_interval=2, async_save=True, **TRAIN)
    crashed = run_deepy("configs/tiny_neox.yml", write_config(
        tmp_path / "a.yml", {**values, "inject_kill_during_save_iters": [4]}))
    assert crashed.returncode != 0
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step2"
    assert not (ckpt / "global_step4" / "manifest.json").exists()
    resumed = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "b.yml", values))
    assert resumed.returncode == 0, explain(resumed)
    assert "(iteration 2)" in resumed.stdout
    assert (ckpt / "latest").read_text() == "global_step6"
    lines = [line for line in resumed.stdout.splitlines() if "saved checkpoint at" in line]
    assert len(lines) == 2 and all("training blocked" in line and "write in the background"
                                   in line for line in lines), lines
    after = {r["iteration"]: r["lm_loss"] for r in records(run)[-4:]}
    reference = losses(uninterrupted)
    for it in (3, 4, 5, 6):
        assert after[it] == pytest.approx(reference[it], abs=1e-6, rel=0), it


def test_pipeline_bf16_resumes_with_its_optimizer_partitions(corpus, tmp_path):
    """PP=2 in bf16 (DeepSpeed's bf16 optimizer without ZeRO, whose partitions its own non-ZeRO
    load path does not read: ``KeyError: 0`` before): a resume from iteration 3 of a 6-step run
    (chosen with ``iteration``) continues with the same losses."""
    first, second = tmp_path / "first", tmp_path / "second"
    pp = {**TRAIN, "pipe_parallel_size": 2, "bf16": {"enabled": True}, "hidden_dropout": 0.0,
          "attention_dropout": 0.0}
    proc = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "a.yml", base_values(
        corpus, first, save=str(first / "ckpt"), save_interval=3, **pp)))
    assert proc.returncode == 0, explain(proc)
    assert list((first / "ckpt" / "global_step3").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    proc = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "b.yml", base_values(
        corpus, second, load=str(first / "ckpt"), iteration=3, **pp)))
    assert proc.returncode == 0, explain(proc)
    assert "(iteration 3)" in proc.stdout
    reference = losses(first)
    resumed = {r["iteration"]: r["lm_loss"] for r in records(second)}
    assert sorted(resumed) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed[it] == pytest.approx(reference[it], abs=1e-6, rel=0), it
