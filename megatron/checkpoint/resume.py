"""The training resume state: atomic checkpoints through the DeepSpeed engine with everything
exact resume needs (model, optimizer, scheduler client state, RNG states, configs).

Layout of ``<save>/``::

    latest                         the tag of the newest complete checkpoint
    global_step100/                one checkpoint (DeepSpeed's model/optimizer files, plus:)
        rng/rank_00000.pt          per-rank RNG states (python, numpy, torch, device, tracker)
        configs/merged.yml         the merged configuration of the run (and the original files)
        layout.json, layout/       the parallel layout and model shape (see relayout.py)
        manifest.json              written last: every file with its size and CRC-32

``latest`` advances only after every rank finished writing and ``manifest.json`` is complete,
so a run killed during a save resumes from the previous checkpoint. With ``async_save`` the
files are written by a background thread (:mod:`megatron.checkpoint.writer`) in the same order.
Loading checks the manifest (sizes and checksums) first, so a damaged checkpoint is a one-line
error naming the file, and reads every file with ``weights_only=True``
(:mod:`megatron.checkpoint.safe_load`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron import accelerator
from megatron.checkpoint.experts import expert_file, expert_state, writes_expert_file
from megatron.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    TAG_PATTERN,
    CheckpointError,
    read_latest,
    step_directories,
    tag_for,
    verify_checkpoint,
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
from megatron.checkpoint.safe_load import load_file, safe_engine_loads
from megatron.checkpoint.writer import (
    CaptureEngine,
    SaveJob,
    Writer,
    complete_checkpoints,
    host_copy,
    prune_checkpoints,
    remove_checkpoint,
)

__all__ = [
    "LoadOptions", "Loaded", "SaveOptions", "Checkpointer", "complete_checkpoints",
    "load_checkpoint", "prune_checkpoints", "refuse_to_start_over", "rng_state",
    "save_checkpoint", "set_rng_state",
]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# ----------------------------------------------------------------------------- RNG states


def rng_state(tracker: Any | None) -> dict[str, Any]:
    """This rank's RNG states: python, numpy, torch CPU, device and the model-parallel tracker,
    as plain tensors, numbers and tuples (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "device": accelerator.device_rng_state(),
        "tracker": tracker.get_states() if tracker is not None else None,
    }


def set_rng_state(states: dict[str, Any], tracker: Any | None) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    if isinstance(numpy_state, tuple) and isinstance(numpy_state[1], torch.Tensor):
        kind, keys, pos, has_gauss, cached = numpy_state
        numpy_state = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    accelerator.set_device_rng_state(states.get("device"))
    if tracker is not None and states.get("tracker") is not None:
        tracker.set_states(states["tracker"])


# ----------------------------------------------------------------------------- save


@dataclass(frozen=True)
class SaveOptions:
    save_dir: str
    keep_last_n: int | None = None
    save_optimizer: bool = True
    save_rng: bool = True
    layout: RunLayout | None = None  # recorded so the checkpoint can resume at another layout
    upload: Any = None  # e.g. an S3Target: rank 0 calls upload(tag_dir) once it is complete


class Checkpointer:
    """Saves of one run: one at a time, each waiting for the previous; with
    ``asynchronous`` the files are written in a background thread once the state is copied
    to host memory. Call :meth:`finish` before the process ends."""

    def __init__(self, *, asynchronous: bool = False):
        self.asynchronous = asynchronous
        self.writer = Writer(background=asynchronous)
        self.group: Any = None
        if _world_size() > 1:
            # the manifest entries travel over their own group: a background thread must not
            # share a process group with the training step
            self.group = torch.distributed.new_group(backend="gloo")

    def poll(self) -> str | None:
        """The line of a background save that finished since the last call."""
        return self.writer.poll()

    def finish(self) -> str | None:
        """Wait for the save in flight (its line, or None)."""
        return self.writer.wait()


def save_checkpoint(
    engine: Any,
    options: SaveOptions,
    *,
    iteration: int,
    client_state: dict[str, Any],
    tracker: Any | None,
    config_files: dict[str, str],
    kill_before_complete: bool = False,
    checkpointer: Checkpointer | None = None,
) -> str | None:
    """Capture what the DeepSpeed engine saves, plus RNG states and configs, and write it all
    (at once, or in the background with an asynchronous ``checkpointer``); the checkpoint
    becomes visible atomically (manifest, then ``latest``). Returns the log line of a save
    that finished within this call: this one when synchronous, else None."""
    checkpointer = checkpointer or Checkpointer()
    earlier = checkpointer.finish()  # the previous save completes before this one starts
    blocked_from = time.perf_counter()
    save_dir = Path(options.save_dir)
    tag_dir = save_dir / tag_for(iteration)
    rank = _rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # a leftover of an interrupted save, or an older run
            remove_checkpoint(tag_dir)
    _barrier()
    hold = checkpointer.asynchronous
    capture = CaptureEngine(engine.checkpoint_engine, tag_dir, hold=hold,
                            save_optimizer=options.save_optimizer)
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = capture
    # expert shards go to their own files (below), DeepSpeed writes its ordinary layout
    has_moe = getattr(engine, "has_moe_layers", False)
    engine.has_moe_layers = False
    try:
        engine.save_checkpoint(str(save_dir), tag=tag_dir.name, client_state=client_state,
                               save_latest=False)
    finally:
        engine.checkpoint_engine = inner
        engine.has_moe_layers = has_moe
    extra: list[tuple[Path, Any]] = []
    experts = expert_state(engine)  # collective under ZeRO 1/2: every rank
    if experts is not None and writes_expert_file(engine):
        extra.append((tag_dir / expert_file(rank), experts))
    if options.save_rng:
        extra.append((tag_dir / "rng" / f"rank_{rank:05d}.pt", host_copy(rng_state(tracker))))
    if options.layout is not None:
        write_layout(tag_dir, engine, options.layout)
    if rank == 0:
        extra += [(tag_dir / "configs" / name, text) for name, text in config_files.items()]
    job = SaveJob(save_dir=save_dir, tag_dir=tag_dir, iteration=iteration, rank=rank,
                  world_size=_world_size(), group=checkpointer.group,
                  files=capture.held + extra, entries=capture.entries,
                  has_optimizer=options.save_optimizer, keep_last_n=options.keep_last_n,
                  kill_before_complete=kill_before_complete, copy_s=capture.copy_s,
                  write_s=capture.write_s,
                  upload=options.upload.upload if options.upload is not None else None)
    if hold:
        job.blocked_s = time.perf_counter() - blocked_from
        checkpointer.writer.submit(job)
        return earlier
    checkpointer.writer.submit(job)
    _barrier()  # no rank goes on before latest names the new checkpoint
    job.blocked_s = time.perf_counter() - blocked_from
    return job.line()


# ----------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadOptions:
    load_dir: str
    load_optimizer: bool = True
    load_rng: bool = True
    finetune: bool = False
    layout: RunLayout | None = None  # the running layout; a different one reshards on load
    iteration: int | None = None
    # parameters a finetune start may lack (they keep their initial values): the reward
    # model's head when it starts from a language model
    fresh_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Loaded:
    iteration: int
    client_state: dict[str, Any]
    tag_dir: Path


def refuse_to_start_over(load_dir: Path) -> None:
    """With complete checkpoints in ``load_dir`` but no ``latest`` (deleted, or the folder
    copied without it), starting from scratch would overwrite them: stop and say which exist
    instead. Incomplete ones alone (a run killed during its first save) are no reason to stop:
    the new run replaces them."""
    steps = step_directories(load_dir)
    complete = [p for _, p in complete_checkpoints(load_dir)]
    if not complete:
        return  # interrupted saves only (a kill during the first save): nothing to lose
    newest = f"; the newest complete one is {complete[-1].name}"
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


def _newer_complete(load_dir: Path, tag: str, log: Callable[[str], None]) -> str:
    """A complete checkpoint newer than the one ``latest`` names exists when a save was cut
    between writing its manifest and updating ``latest``: resume from it."""
    match = TAG_PATTERN.match(tag)
    if match is None:
        return tag
    for step, path in reversed(complete_checkpoints(load_dir)):
        if step <= int(match.group(1)):
            break
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        log(f"{path} is complete and newer than {tag}, which '{LATEST}' names (a save was "
            "interrupted before updating it): loading it")
        return path.name
    return tag


def choose_checkpoint(options: LoadOptions, log: Callable[[str], None]) -> tuple[Path, str] | None:
    """The directory and tag to load: ``load`` itself when it is a ``global_stepN`` directory,
    ``global_step{iteration}`` when ``iteration`` is set, else the tag ``latest`` names (or a
    newer complete checkpoint); None when there is nothing to load."""
    load_dir = Path(options.load_dir)
    if TAG_PATTERN.match(load_dir.name) and not (load_dir / LATEST).is_file() and \
            ((load_dir / MANIFEST).is_file() or any(load_dir.glob("*model_states.pt"))):
        if options.iteration is not None and tag_for(options.iteration) != load_dir.name:
            raise CheckpointError(f"{load_dir}: load names this checkpoint directory, but "
                                  f"iteration is {options.iteration}")
        return load_dir.parent, load_dir.name
    if options.iteration is not None:
        tag = tag_for(options.iteration)
        if not (load_dir / tag).is_dir():
            found = ", ".join(p.name for p in step_directories(load_dir)[-5:]) or "none"
            raise CheckpointError(f"{load_dir / tag}: not found (iteration: "
                                  f"{options.iteration}; checkpoints in {load_dir}: {found})")
        return load_dir, tag
    tag = read_latest(load_dir)
    if tag is None:
        refuse_to_start_over(load_dir)
        log(f"no checkpoint in {load_dir} (no '{LATEST}' file): starting from scratch")
        return None
    return load_dir, _newer_complete(load_dir, tag, log)


def load_checkpoint(
    engine: Any,
    options: LoadOptions,
    *,
    tracker: Any | None,
    log: Callable[[str], None] = print,
) -> Loaded | None:
    """Load the chosen complete checkpoint (see :func:`choose_checkpoint`); None when there
    is none."""
    chosen = choose_checkpoint(options, log)
    if chosen is None:
        return None
    load_dir, tag = chosen
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
    fresh = options.fresh_prefixes
    fresh_names: list[str] = []
    if saved is not None and run is not None and (
            saved.layout != run.layout or saved.layout.ep > 1):  # expert shards: relayout
        client_state = load_at_new_layout(engine, tag_dir, saved, run,
                                          load_optimizer=load_optimizer, log=log,
                                          fresh_prefixes=fresh, fresh_names=fresh_names)
        rng_rank = rng_source_rank(saved, run)
    else:
        with _tolerate_fresh(engine, tag_dir, fresh, fresh_names):
            client_state = _load_same_layout(engine, load_dir, tag, load_optimizer, module_only)
        rng_rank = _rank()
    if fresh_names:
        if not module_only:
            raise CheckpointError(
                f"{tag_dir}: {fresh_names[0]} is missing from the checkpoint (a language "
                "model's): start from it with finetune: true")
        if _rank() == 0:
            log(f"{tag_dir} has no {', '.join(sorted({n.split('.')[0] for n in fresh_names}))}"
                ": it starts freshly initialised")
    client_state = dict(client_state or {})
    if options.load_rng and not module_only:
        rng_file = tag_dir / "rng" / f"rank_{rng_rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(load_file(rng_file), tracker)
        else:
            log(f"warning: {rng_file} not found (different world size?); RNG states not restored")
    iteration = 0 if module_only else int(client_state.get("iteration", manifest["iteration"]))
    log(f"loaded checkpoint {tag_dir} (iteration {iteration})")
    return Loaded(iteration, client_state, tag_dir)


@contextlib.contextmanager
def _tolerate_fresh(engine: Any, tag_dir: Path, prefixes: tuple[str, ...],
                    missing: list[str]) -> Iterator[None]:
    """Let DeepSpeed's module load leave the parameters under ``prefixes`` at their initial
    values when the checkpoint lacks them (collected into ``missing``); every other missing
    or unexpected entry is still an error naming it."""
    module = getattr(engine, "module", None)
    if not prefixes or module is None:
        yield
        return
    original = module.load_state_dict

    def load_state_dict(state_dict: Any, strict: bool = True, **kwargs: Any) -> Any:
        result = original(state_dict, strict=False, **kwargs)
        if strict:
            bad_missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
            if result.unexpected_keys or bad_missing:
                first = (bad_missing or result.unexpected_keys)[0]
                what = "missing from the checkpoint" if bad_missing else \
                    "in the checkpoint but not in the model of the config"
                raise CheckpointError(f"{tag_dir}: {first} is {what} "
                                      "(config/architecture mismatch)")
        missing.extend(k for k in result.missing_keys if k.startswith(prefixes))
        return result

    module.load_state_dict = load_state_dict
    try:
        yield
    finally:
        del module.load_state_dict


def _load_same_layout(engine: Any, load_dir: Path, tag: str, load_optimizer: bool,
                      module_only: bool) -> dict[str, Any]:
    """The fast path: DeepSpeed's engine loads the files of its own layout."""
    tag_dir = load_dir / tag
    # DeepSpeed's bf16 optimizer without ZeRO (the pipeline engine's) writes its partitions to
    # ``bf16_zero_*_optim_states.pt`` files but its non-ZeRO load path hands the optimizer the
    # model-states entry instead (``KeyError: 0`` inside BF16_Optimizer): its own partition files
    # are loaded here after the module.
    bf16_partitions = (load_optimizer and not module_only and hasattr(engine, "optimizer")
                       and hasattr(engine.optimizer, "bf16_groups")
                       and not engine.zero_optimization())
    try:
        with safe_engine_loads(engine):
            path, client_state = engine.load_checkpoint(
                str(load_dir), tag=tag,
                load_optimizer_states=load_optimizer and not bf16_partitions,
                load_lr_scheduler_states=False, load_module_only=module_only,
            )
            if bf16_partitions and path is not None and not engine._load_zero_checkpoint(
                    str(load_dir), tag, load_optimizer_states=True):
                raise CheckpointError(f"{tag_dir}: has no bf16 optimizer partition files "
                                      "(bf16_zero_pp_rank_*_optim_states.pt)")
    except CheckpointError:
        raise
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
