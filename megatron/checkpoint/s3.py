"""Uploading a saved checkpoint to S3 (``s3_path``, ``s3_chunk_size``).

Every file under ``<save>/global_stepN`` goes to ``<s3_path>/<basename of save>/global_stepN/``
with its relative path, as a multipart upload of ``s3_chunk_size``-byte parts (a file of up to
one part is one part), several files at once. Credentials, region and endpoint come from the
environment as boto3 reads them (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...). A failed
upload is aborted (no partial object stays behind) and reported in one line.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.checkpoint.manifest import CheckpointError
from megatron.neox_arguments.checks_services import s3_bucket_and_prefix


@dataclass(frozen=True)
class S3Target:
    path: str  # s3://bucket[/prefix]
    chunk_size: int = 104_857_600
    max_workers: int = 8

    def key_prefix(self, tag_dir: Path) -> tuple[str, str]:
        """The bucket and the key prefix of one checkpoint directory."""
        bucket, prefix = s3_bucket_and_prefix(self.path)
        run = tag_dir.resolve().parent.name
        return bucket, "/".join(p for p in (prefix, run, tag_dir.name) if p)

    def upload(self, tag_dir: Path) -> str:
        """Upload every file of ``tag_dir``; returns a one-line summary."""
        return upload_checkpoint(tag_dir, self)


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise CheckpointError("s3_path: needs the boto3 package (pip install boto3)") from None
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                    read_timeout=120)
    return boto3.client("s3", config=config)


def upload_file(client: Any, path: Path, bucket: str, key: str, chunk_size: int) -> int:
    """One multipart upload of ``path`` in ``chunk_size`` parts; returns the number of parts."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    try:
        with open(path, "rb") as f:
            number = 1
            while True:
                data = f.read(chunk_size)
                if not data and number > 1:
                    break
                reply = client.upload_part(Bucket=bucket, Key=key, PartNumber=number,
                                           UploadId=upload_id, Body=data)
                parts.append({"ETag": reply["ETag"], "PartNumber": number})
                number += 1
                if len(data) < chunk_size:
                    break
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # the original error is the one to report
            pass
        raise
    return len(parts)


def upload_checkpoint(tag_dir: Path, target: S3Target) -> str:
    bucket, prefix = target.key_prefix(tag_dir)
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    where = f"s3://{bucket}/{prefix}"
    start = time.perf_counter()
    try:
        client = _client()
        with ThreadPoolExecutor(max_workers=max(1, min(target.max_workers, len(files)))) as pool:
            jobs = [pool.submit(upload_file, client, p, bucket,
                                f"{prefix}/{p.relative_to(tag_dir).as_posix()}",
                                target.chunk_size) for p in files]
            parts = sum(job.result() for job in jobs)
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"s3_path: uploading {tag_dir} to {where} failed: {first}") \
            from None
    size = sum(os.path.getsize(p) for p in files) / 1e6
    return (f"uploaded checkpoint {tag_dir.name} to {where}: {len(files)} files, {size:.1f} MB "
            f"in {parts} parts, {time.perf_counter() - start:.2f} s")
