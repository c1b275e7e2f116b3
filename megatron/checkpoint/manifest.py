"""What makes a checkpoint directory complete: step tags, ``latest`` and ``manifest.json``.

Shared by the training resume state (:mod:`megatron.checkpoint.resume`) and the weight files
read and written without DeepSpeed (:mod:`megatron.checkpoint.weights`)::

    <save>/latest                  the tag of the newest complete checkpoint
    <save>/global_stepN/           one checkpoint
        manifest.json              written last: every file with its size, the iteration and
                                   whether optimizer state is present

A step directory without ``manifest.json`` is an interrupted save; a file whose size differs
from the manifest is damaged. Both are one-line :class:`CheckpointError` s naming the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

TAG_PATTERN = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, reported as one line naming the file."""


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(tag_dir: Path, iteration: int, *, has_optimizer: bool = True) -> None:
    files = {}
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(tag_dir))] = path.stat().st_size
    manifest = {"iteration": iteration, "has_optimizer": has_optimizer, "files": files}
    atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))


def verify_checkpoint(tag_dir: Path) -> dict[str, Any]:
    """Check that every file the manifest lists is present and whole."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MANIFEST}); the save that "
                              "wrote it did not finish")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: damaged ({actual} bytes, the manifest says {size})")
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
