"""Writing a checkpoint's files, in the foreground or in a background thread.

A save first *captures* what the DeepSpeed engine would write: :class:`CaptureEngine` stands in
for the engine's checkpoint engine during ``engine.save_checkpoint``, so every
``(state dict, path)`` DeepSpeed hands over lands here instead of in ``torch.save``. The files
keep DeepSpeed's names and contents, so loading is unchanged.

* synchronous saves write each file at once (views compacted as DeepSpeed would);
* asynchronous saves (``async_save``) copy every tensor to host memory -- the only part the
  step loop waits for -- and a :class:`SaveJob` writes the files, the manifest and ``latest``
  in a background thread, in that order.

Every file is CRC-32'd while it is written (:class:`~megatron.checkpoint.manifest.
ChecksumWriter`) and fsync'd before the manifest names it; with several ranks the entries are
gathered to rank 0 over a dedicated gloo group (so the background thread never shares a
process group with the training step), and rank 0 writes ``manifest.json``, then ``latest``,
then uploads the checkpoint when the job has an ``upload`` (``s3_path``:
:mod:`megatron.checkpoint.s3`), then prunes.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    TAG_PATTERN,
    CheckpointError,
    ChecksumWriter,
    atomic_write,
    fsync_dir,
    write_manifest,
)

Entries = dict[str, dict[str, Any]]


# ----------------------------------------------------------------------------- copies


def host_copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor copied to host memory (one copy per tensor object, so tensors
    that appear twice in ``obj`` stay shared); containers rebuilt, other objects deep-copied.
    One ``memo`` per object saved: it is keyed by ``id``, valid only while ``obj`` lives."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return _rebuild_dict(obj, [(k, host_copy(v, memo)) for k, v in obj.items()])
    if isinstance(obj, list):
        return [host_copy(v, memo) for v in obj]
    if isinstance(obj, tuple):
        items = [host_copy(v, memo) for v in obj]
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items) if type(obj) is not tuple else tuple(items)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def _rebuild_dict(like: dict, items: list[tuple[Any, Any]]) -> dict:
    try:
        out = type(like)()
    except TypeError:  # a dict subclass that needs arguments
        out = {}
    out.update(items)
    return out


def compact_views(obj: Any) -> Any:
    """Tensors that view a larger storage replaced by copies of their own elements (what
    ``torch.save`` would otherwise write whole); everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        storage_bytes = obj.untyped_storage().nbytes()
        if storage_bytes > obj.numel() * obj.element_size():
            return obj.detach().clone()
        return obj
    if isinstance(obj, dict):
        return _rebuild_dict(obj, [(k, compact_views(v)) for k, v in obj.items()])
    if isinstance(obj, list):
        return [compact_views(v) for v in obj]
    return obj


def write_file(path: Path, obj: Any) -> dict[str, Any]:
    """``torch.save`` (or plain text for ``str``) into ``path``, CRC-32'd while written and
    fsync'd; returns the manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        out = ChecksumWriter(fh)
        if isinstance(obj, str):
            out.write(obj.encode())
        else:
            torch.save(obj, out)
        fh.flush()
        os.fsync(fh.fileno())
    return out.entry()


# ----------------------------------------------------------------------------- capture


class CaptureEngine:
    """Takes the place of a DeepSpeed engine's ``checkpoint_engine`` during one save: files
    are either written at once (``hold=False``) or copied to host memory and held for a
    background :class:`SaveJob` (``hold=True``)."""

    def __init__(self, inner: Any, tag_dir: Path, *, hold: bool, save_optimizer: bool):
        self._inner = inner
        self.tag_dir = tag_dir
        self.hold = hold
        self.save_optimizer = save_optimizer
        self.held: list[tuple[Path, Any]] = []
        self.entries: Entries = {}
        self.copy_s = 0.0  # host copies (held files)
        self.write_s = 0.0  # files written at once

    def save(self, state_dict: Any, path: str) -> None:
        target = Path(path)
        if not self.save_optimizer:
            if target.name.endswith("optim_states.pt"):
                return  # no_save_optim: the ZeRO shards are left out
            if isinstance(state_dict, dict) and state_dict.get("optimizer") is not None:
                state_dict = {**state_dict, "optimizer": None}
        start = time.perf_counter()
        if self.hold:
            self.held.append((target, host_copy(state_dict)))
            self.copy_s += time.perf_counter() - start
        else:
            self.entries[self.rel(target)] = write_file(target, compact_views(state_dict))
            self.write_s += time.perf_counter() - start

    def rel(self, path: Path) -> str:
        return path.relative_to(self.tag_dir).as_posix()

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def create(self, info: Any) -> None:
        return None

    def commit(self, info: Any) -> bool:
        return True

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False  # copies are made here (host_copy / compact_views), not by DeepSpeed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ----------------------------------------------------------------------------- the job


@dataclass
class SaveJob:
    """Everything left of one save once the state is captured: write this rank's files, gather
    the manifest entries, and on rank 0 write the manifest, ``latest`` and prune."""

    save_dir: Path
    tag_dir: Path
    iteration: int
    rank: int
    world_size: int
    group: Any
    files: list[tuple[Path, Any]]
    entries: Entries
    has_optimizer: bool
    keep_last_n: int | None
    blocked_s: float = 0.0
    kill_before_complete: bool = False
    copy_s: float = 0.0
    write_s: float = 0.0
    total_bytes: int = 0
    background: bool = False
    upload: Any = None  # rank 0: called with tag_dir once the checkpoint is complete
    upload_line: str | None = None

    def run(self) -> None:
        start = time.perf_counter()
        entries = dict(self.entries)
        for path, obj in self.files:
            entries[path.relative_to(self.tag_dir).as_posix()] = write_file(path, obj)
        self.files = []  # the host copies can go
        for sub in {p.parent for p in self.tag_dir.rglob("*") if p.is_file()}:
            fsync_dir(sub)
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, entries, group=self.group)
            for part in gathered:
                entries.update(part or {})
        if self.rank == 0:
            if self.kill_before_complete:  # fault injection: die as a crash mid-save would
                os.kill(os.getpid(), signal.SIGKILL)
            write_manifest(self.tag_dir, self.iteration, has_optimizer=self.has_optimizer,
                           known=entries)
            atomic_write(self.save_dir / LATEST, self.tag_dir.name)
            if self.upload is not None:
                self.upload_line = self.upload(self.tag_dir)
            prune_checkpoints(self.save_dir, self.keep_last_n, protect=self.tag_dir.name)
        self.total_bytes = sum(int(e["size"]) for e in entries.values())
        self.write_s += time.perf_counter() - start

    def line(self) -> str:
        """One line: training blocked, the write (for synchronous saves: the files written
        during DeepSpeed's save included), size and rate."""
        size = self.total_bytes / 1e6
        rate = size / self.write_s if self.write_s > 0 else float("inf")
        where = "in the background " if self.background else ""
        copy = f" (copy to host memory {self.copy_s:.3f} s)" if self.copy_s > 0 else ""
        line = (f"saved checkpoint at iteration {self.iteration} to {self.save_dir}: training "
                f"blocked {self.blocked_s:.3f} s{copy}, write {where}{self.write_s:.3f} s "
                f"({size:.1f} MB, {rate:.0f} MB/s)")
        return line if self.upload_line is None else f"{line}; {self.upload_line}"


class Writer:
    """Runs :class:`SaveJob` s one at a time, inline or in a background thread; the next
    save and the end of the run wait for the one in flight."""

    def __init__(self, *, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._job: SaveJob | None = None
        self._error: BaseException | None = None

    def submit(self, job: SaveJob) -> str | None:
        """Run ``job``; returns its log line when it ran inline."""
        self.wait()
        job.background = self.background
        if not self.background:
            job.run()
            return job.line()
        self._job, self._error = job, None
        self._thread = threading.Thread(target=self._run, args=(job,),
                                        name=f"checkpoint-{job.iteration}", daemon=True)
        self._thread.start()
        return None

    def _run(self, job: SaveJob) -> None:
        try:
            job.run()
        except BaseException as exc:  # reported by wait()/poll() on the main thread
            self._error = exc

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def poll(self) -> str | None:
        """The line of a background save that has finished since the last call, else None."""
        if self._thread is not None and not self._thread.is_alive():
            return self.wait()
        return None

    def wait(self) -> str | None:
        """Wait for the save in flight; its line (None when there was none)."""
        thread, job = self._thread, self._job
        if thread is None or job is None:
            return None
        thread.join()
        self._thread, self._job = None, None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"{job.tag_dir}: the background save failed "
                                  f"({type(error).__name__}: {error})") from error
        return job.line()


# ----------------------------------------------------------------------------- pruning


def complete_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for path in save_dir.iterdir() if save_dir.is_dir() else []:
        match = TAG_PATTERN.match(path.name)
        if match and path.is_dir() and (path / MANIFEST).is_file():
            out.append((int(match.group(1)), path))
    return sorted(out)


def prune_checkpoints(save_dir: Path, keep_last: int | None, protect: str | None) -> list[Path]:
    """Delete old complete checkpoints beyond ``keep_last`` and incomplete leftovers."""
    removed: list[Path] = []
    for path in save_dir.iterdir() if save_dir.is_dir() else []:
        if TAG_PATTERN.match(path.name) and path.is_dir() and not (path / MANIFEST).is_file() \
                and path.name != protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if keep_last is not None:
        complete = complete_checkpoints(save_dir)
        for _, path in complete[: max(0, len(complete) - keep_last)]:
            if path.name != protect:
                remove_checkpoint(path)
                removed.append(path)
    return removed


def remove_checkpoint(path: Path) -> None:
    """Delete a step directory, its manifest first (so a crash half-way leaves an incomplete
    checkpoint, never a 'complete' one with files missing)."""
    (path / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)

