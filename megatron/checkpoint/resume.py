"""The training resume state: atomic checkpoints through the DeepSpeed engine with everything
exact resume needs (model, optimizer, scheduler client state, RNG states, configs).

Layout of ``<save>/``::

    latest                         the tag of the newest complete checkpoint
    global_step100/                one checkpoint (DeepSpeed's model/optimizer files, plus:)
        rng/rank_00000.pt          per-rank RNG states (python, numpy, torch, device, tracker)
        configs/merged.yml         the merged configuration of the run (and the original files)
        layout.json, layout/       the parallel layout and model shape (see relayout.py)
        manifest.json              written last: every file with its size

``latest`` advances only after every rank finished writing and ``manifest.json`` is complete,
so a run killed during a save resumes from the previous checkpoint. Loading checks the
manifest first, so a damaged checkpoint is a one-line error naming the file.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron import accelerator
from megatron.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    TAG_PATTERN,
    CheckpointError,
    atomic_write,
    read_latest,
    step_directories,
    tag_for,
    verify_checkpoint,
    write_manifest,
)
from megatron.checkpoint.relayout import (
    RunLayout,
    check_model_shape,
    load_at_new_layout,
    parse_state_dict_error,
    read_layout,
    rng_source_rank,
    write_layout,
)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# ----------------------------------------------------------------------------- RNG states


def rng_state(tracker: Any | None) -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, device and the model-parallel tracker."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "device": accelerator.device_rng_state(),
        "tracker": tracker.get_states() if tracker is not None else None,
    }


def set_rng_state(states: dict[str, Any], tracker: Any | None) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    accelerator.set_device_rng_state(states.get("device"))
    if tracker is not None and states.get("tracker") is not None:
        tracker.set_states(states["tracker"])


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
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------- save / load


@dataclass(frozen=True)
class SaveOptions:
    save_dir: str
    keep_last_n: int | None = None
    save_optimizer: bool = True
    save_rng: bool = True
    layout: RunLayout | None = None  # recorded so the checkpoint can resume at another layout


def save_checkpoint(
    engine: Any,
    options: SaveOptions,
    *,
    iteration: int,
    client_state: dict[str, Any],
    tracker: Any | None,
    config_files: dict[str, str],
    kill_before_complete: bool = False,
) -> Path:
    """Save through the DeepSpeed engine, then make the checkpoint visible atomically."""
    save_dir = Path(options.save_dir)
    tag = tag_for(iteration)
    tag_dir = save_dir / tag
    rank = _rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a leftover of an interrupted save, or an older run
            shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    if options.save_rng:
        rng_dir = tag_dir / "rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(tracker), rng_dir / f"rank_{rank:05d}.pt")
    if options.layout is not None:
        write_layout(tag_dir, engine, options.layout)
    if rank == 0:
        cfg_dir = tag_dir / "configs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        for name, text in config_files.items():
            (cfg_dir / name).write_text(text)
        if kill_before_complete:  # fault injection: die as a crash mid-save would
            os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if rank == 0:
        if not options.save_optimizer:
            _strip_optimizer_state(tag_dir)
        write_manifest(tag_dir, iteration, has_optimizer=options.save_optimizer)
        atomic_write(save_dir / LATEST, tag)
        prune_checkpoints(save_dir, options.keep_last_n, protect=tag)
    _barrier()
    return tag_dir


def _strip_optimizer_state(tag_dir: Path) -> None:
    """``no_save_optim``: drop the optimizer state DeepSpeed wrote (ZeRO shards and the
    ``optimizer`` entry of the model-state files). Runs on rank 0 once every rank has written."""
    for path in tag_dir.glob("*optim_states.pt"):
        path.unlink(missing_ok=True)
    for path in tag_dir.glob("*model_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and state.get("optimizer") is not None:
            state["optimizer"] = None
            tmp = path.with_name(path.name + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)


@dataclass(frozen=True)
class LoadOptions:
    load_dir: str
    load_optimizer: bool = True
    load_rng: bool = True
    finetune: bool = False
    layout: RunLayout | None = None  # the running layout; a different one reshards on load


@dataclass(frozen=True)
class Loaded:
    iteration: int
    client_state: dict[str, Any]
    tag_dir: Path


def refuse_to_start_over(load_dir: Path) -> None:
    """With checkpoints in ``load_dir`` but no ``latest`` (deleted, or the folder copied without
    it), starting from scratch would overwrite them: stop and say which exist instead."""
    steps = step_directories(load_dir)
    if not steps:
        return
    complete = [p for _, p in complete_checkpoints(load_dir)]
    newest = f"; the newest complete one is {complete[-1].name}" if complete else \
        "; none of them is complete"
    names = ", ".join(p.name for p in steps[-5:]) + (" ..." if len(steps) > 5 else "")
    raise CheckpointError(
        f"{load_dir}: holds {names} but no '{LATEST}' file{newest}: write the tag to resume "
        f"from into {load_dir / LATEST}, or point load/save at another directory (a run from "
        "scratch would overwrite these)")


def _earlier_hint(load_dir: Path, tag: str) -> str:
    """The newest complete checkpoint other than ``tag``, as advice after a load error."""
    others = [p for _, p in complete_checkpoints(load_dir) if p.name != tag]
    if not others:
        return ""
    return (f"; the newest complete checkpoint besides it is {others[-1]} (write "
            f"'{others[-1].name}' into {load_dir / LATEST} to resume from it)")


def load_checkpoint(
    engine: Any,
    options: LoadOptions,
    *,
    tracker: Any | None,
    log: Callable[[str], None] = print,
) -> Loaded | None:
    """Load the newest complete checkpoint of ``load_dir``; None when there is none."""
    load_dir = Path(options.load_dir)
    tag = read_latest(load_dir)
    if tag is None:
        refuse_to_start_over(load_dir)
        log(f"no checkpoint in {load_dir} (no '{LATEST}' file): starting from scratch")
        return None
    tag_dir = load_dir / tag
    try:
        manifest = verify_checkpoint(tag_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{_earlier_hint(load_dir, tag)}") from None
    module_only = options.finetune
    load_optimizer = options.load_optimizer and not module_only
    if load_optimizer and not manifest.get("has_optimizer", True):
        log(f"{tag_dir} holds no optimizer state (saved with no_save_optim, or converted): "
            "the optimizer starts fresh")
        load_optimizer = False
    saved, run = read_layout(tag_dir), options.layout
    if saved is not None and run is not None:
        check_model_shape(tag_dir, saved, run.shape)
    if saved is not None and run is not None and saved.layout != run.layout:
        client_state = load_at_new_layout(engine, tag_dir, saved, run,
                                          load_optimizer=load_optimizer, log=log)
        rng_rank = rng_source_rank(saved, run)
    else:
        client_state = _load_same_layout(engine, load_dir, tag, load_optimizer, module_only)
        rng_rank = _rank()
    client_state = dict(client_state or {})
    if options.load_rng and not module_only:
        rng_file = tag_dir / "rng" / f"rank_{rng_rank:05d}.pt"
        if rng_file.is_file():
            try:
                states = torch.load(rng_file, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise CheckpointError(f"{rng_file}: cannot load ({exc})") from None
            set_rng_state(states, tracker)
        else:
            log(f"warning: {rng_file} not found (different world size?); RNG states not restored")
    iteration = 0 if module_only else int(client_state.get("iteration", manifest["iteration"]))
    log(f"loaded checkpoint {tag_dir} (iteration {iteration})")
    return Loaded(iteration, client_state, tag_dir)


def _load_same_layout(engine: Any, load_dir: Path, tag: str, load_optimizer: bool,
                      module_only: bool) -> dict[str, Any]:
    """The fast path: DeepSpeed's engine loads the files of its own layout."""
    tag_dir = load_dir / tag
    try:
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=tag,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=False, load_module_only=module_only,
        )
    except FileNotFoundError as exc:  # files of another layout, saved before layouts were recorded
        raise CheckpointError(
            f"{tag_dir}: has no {Path(str(exc.filename or '')).name or 'file'} for this parallel "
            "layout; it was written at another tensor/pipeline/data-parallel size or ZeRO stage "
            "before checkpoints recorded their layout: resume it at the layout that wrote "
            "it") from None
    except Exception as exc:  # torch.load / DeepSpeed errors on damaged files
        detail = parse_state_dict_error(tag_dir, str(exc))
        if detail is not None:
            raise CheckpointError(detail) from None
        raise CheckpointError(f"{tag_dir}: cannot load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed found no model states to load")
    return dict(client_state or {})
