"""Upload of saved checkpoints to S3 (``s3_path``, ``s3_chunk_size``), against a real
S3-protocol server on loopback (moto in server mode): after a save the bucket holds every file
of the checkpoint with equal bytes, large files in ``s3_chunk_size`` parts; a server that
cannot be reached is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.checkpoint.manifest import CheckpointError
from megatron.checkpoint.s3 import S3Target
from megatron.checkpoint.writer import SaveJob, Writer
from tests.s3_server import free_port, moto_s3_server, s3_env

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch, s3_server):
    for name, value in s3_env(s3_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    return boto3.client("s3")


def _save(tmp_path: Path, upload) -> tuple[Path, str | None]:
    save_dir = tmp_path / "run-a"
    tag_dir = save_dir / "global_step7"
    big = torch.arange(11 * MiB // 4, dtype=torch.float32)  # 11 MiB: three 5 MiB parts
    files = [(tag_dir / "mp_rank_00_model_states.pt", {"module": {"w": big}}),
             (tag_dir / "rng" / "rank_00000.pt", {"torch": torch.get_rng_state()}),
             (tag_dir / "configs" / "merged.yml", "s3_path: s3://ckpts/neox\n")]
    job = SaveJob(save_dir=save_dir, tag_dir=tag_dir, iteration=7, rank=0, world_size=1,
                  group=None, files=files, entries={}, has_optimizer=False, keep_last_n=None,
                  upload=upload)
    writer = Writer(background=True)  # as with async_save: the upload follows the write
    writer.submit(job)
    return tag_dir, writer.wait()


def test_every_file_of_a_saved_checkpoint_lands_in_the_bucket(tmp_path, aws_env):
    client = aws_env
    client.create_bucket(Bucket="ckpts")
    target = S3Target("s3://ckpts/neox/", chunk_size=5 * MiB)
    tag_dir, line = _save(tmp_path, target.upload)
    local = {p.relative_to(tag_dir).as_posix(): p.read_bytes()
             for p in tag_dir.rglob("*") if p.is_file()}
    assert "manifest.json" in local and len(local) == 4
    listed = client.list_objects_v2(Bucket="ckpts", Prefix="neox/")["Contents"]
    remote = {o["Key"]: o for o in listed}
    assert set(remote) == {f"neox/run-a/global_step7/{name}" for name in local}
    for name, data in local.items():
        key = f"neox/run-a/global_step7/{name}"
        assert client.get_object(Bucket="ckpts", Key=key)["Body"].read() == data, name
    # a multipart object's ETag ends with its part count
    big = remote["neox/run-a/global_step7/mp_rank_00_model_states.pt"]
    assert big["Size"] > 10 * MiB and big["ETag"].strip('"').endswith("-3")
    assert remote["neox/run-a/global_step7/manifest.json"]["ETag"].strip('"').endswith("-1")
    assert line is not None and "; uploaded checkpoint global_step7 to s3://ckpts/neox/run-a/" \
        "global_step7: 4 files" in line and "in 6 parts" in line


def test_unreachable_endpoint_and_missing_bucket_are_one_line(tmp_path, monkeypatch, aws_env):
    target = S3Target("s3://no-such-bucket/x", chunk_size=5 * MiB)
    with pytest.raises(CheckpointError, match="background save failed") as info:
        _save(tmp_path / "a", target.upload)
    cause = info.value.__cause__
    assert isinstance(cause, CheckpointError) and "\n" not in str(cause)
    assert str(cause).startswith(f"s3_path: uploading {tmp_path / 'a' / 'run-a'}/global_step7 "
                                 "to s3://no-such-bucket/x/run-a/global_step7 failed: ")
    assert "NoSuchBucket" in str(cause)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(CheckpointError) as info:
        S3Target("s3://ckpts/x").upload(_step_dir(tmp_path / "b"))
    assert "Could not connect to the endpoint URL" in str(info.value)
    assert "\n" not in str(info.value)


def _step_dir(root: Path) -> Path:
    tag_dir = root / "run" / "global_step1"
    tag_dir.mkdir(parents=True)
    (tag_dir / "latest").write_text("x")
    return tag_dir
