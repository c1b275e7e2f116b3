"""What makes a checkpoint directory complete: step tags, ``latest`` and ``manifest.json``.

Shared by the training resume state (:mod:`megatron.checkpoint.resume`) and the weight files
read and written without DeepSpeed (:mod:`megatron.checkpoint.weights`)::

    <save>/latest                  the tag of the newest complete checkpoint
    <save>/global_stepN/           one checkpoint
        manifest.json              written last: every file with its size and CRC-32, the
                                   iteration and whether optimizer state is present

A step directory without ``manifest.json`` is an interrupted save; a file whose size or CRC-32
differs from the manifest is damaged. Both are one-line :class:`CheckpointError` s naming the
file. Manifests written before checksums existed (sizes only) are still accepted.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, reported as one line naming the file."""


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def fsync_dir(path: Path) -> None:
    """Make the names in ``path`` (new files, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- checksums


class ChecksumWriter:
    """A binary file wrapper that counts and CRC-32s the bytes as they are written (so a file
    is hashed once, while it is written, instead of being read back)."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(memoryview(data).cast("B"))
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "crc32": f"{self.crc:08x}"}


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a file already on disk: its size and CRC-32."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def write_manifest(tag_dir: Path, iteration: int, *, has_optimizer: bool = True,
                   known: Mapping[str, dict[str, Any]] | None = None) -> None:
    """List every file of ``tag_dir`` with its size and CRC-32, then write the manifest
    atomically. ``known`` holds entries computed while writing (relative path -> entry);
    other files are read and hashed here."""
    known = known or {}
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(tag_dir).as_posix()
            files[rel] = dict(known[rel]) if rel in known else file_entry(path)
    manifest = {"iteration": iteration, "has_optimizer": has_optimizer, "files": files}
    atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def verify_checkpoint(tag_dir: Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check that every file the manifest lists is present and whole (size, and CRC-32 when
    ``checksums`` and the manifest has one)."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MANIFEST}); the save that "
                              "wrote it did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        entries = {rel: e if isinstance(e, dict) else {"size": int(e)}
                   for rel, e in files.items()}
        for entry in entries.values():
            int(entry["size"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for rel, entry in entries.items():
        path = tag_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        actual = path.stat().st_size
        if actual != int(entry["size"]):
            raise CheckpointError(f"{path}: damaged ({actual} bytes, the manifest says "
                                  f"{entry['size']})")
    if checksums:
        for rel, entry in entries.items():
            if "crc32" not in entry:
                continue
            got = file_entry(tag_dir / rel)["crc32"]
            if got != entry["crc32"]:
                raise CheckpointError(f"{tag_dir / rel}: damaged (CRC-32 {got}, the manifest "
                                      f"says {entry['crc32']})")
    return manifest


def read_latest(load_dir: Path) -> str | None:
    """The tag ``latest`` names (None without the file); a tag that is not a directory name
    inside ``load_dir`` (``..``, a path) is an error, never followed."""
    path = load_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag:
        raise CheckpointError(f"{path}: empty")
    if tag in (".", "..") or "/" in tag or "\\" in tag:
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint directory "
                              f"inside {load_dir}")
    return tag


def step_directories(save_dir: Path) -> list[Path]:
    """Every ``global_stepN`` directory of ``save_dir``, complete or not, oldest first."""
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir()
             if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]
