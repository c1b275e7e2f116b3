"""A checkpoint's model weight files, read and written without DeepSpeed.

Reading accepts both layouts the trainer's DeepSpeed engine writes into ``<save>/global_stepN/``:

* plain model (``pipe_parallel_size: 0``): ``mp_rank_{tp:02d}_model_states.pt``, one per
  tensor-parallel rank, with the ``GPTModel`` state dict under ``"module"``;
* pipeline (``pipe_parallel_size >= 1``): ``layer_{idx:02d}-model_{tp:02d}-model_states.pt``, one
  per pipeline spec and tensor-parallel rank (the spec's keys without the ``{idx}.`` prefix),
  plus ``mp_rank_{pp * tp + tp_rank:02d}_model_states.pt`` with ``"module": None``.

Either way the result is in ``GPTModel`` names (pipeline names mapped with
:func:`~megatron.model.pipeline.pipeline_key_to_model_key`). Tensor-parallel shards merge into
full tensors and full tensors split into shards with the split rules the layers record
(:mod:`megatron.checkpoint.reshard`).

:func:`write_checkpoint` writes what the trainer's engine would save for a model without
optimizer state (plain or pipeline layout, any tensor-parallel size) plus ``latest``,
``manifest.json`` (which records that there is no optimizer state, so the trainer starts a
fresh optimizer) and ``configs/merged.yml``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import torch

from megatron.checkpoint.experts import expert_weights
from megatron.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    CheckpointError,
    atomic_write,
    read_latest,
    tag_for,
    verify_checkpoint,
    write_manifest,
)
from megatron.checkpoint.reshard import StateDict, merge_tp_shards, split_tp
from megatron.checkpoint.safe_load import load_file
from megatron.model import pipeline_key_to_model_key
from megatron.model.args import ModelArgs
from megatron.model.gpt import layer_plan
from megatron.model.layout import pipeline_layout

MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
LAYER_STATES = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
ZERO3_STATES = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
MERGED_CONFIG = Path("configs") / "merged.yml"


# ---------------------------------------------------------------------- locating
@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint step directory and the layout of its model files."""

    tag_dir: Path
    layout: Literal["plain", "pipeline"]
    tp_size: int
    pp_size: int
    iteration: int

    @property
    def merged_config(self) -> Path:
        return self.tag_dir / MERGED_CONFIG


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The step directory of ``path``: a ``load``/``save`` directory (its ``latest``
    checkpoint) or a ``global_stepN`` directory itself. Verified against its manifest."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint directory not found")
    tag = read_latest(p)
    if tag is not None:
        tag_dir = p / tag
        if not tag_dir.is_dir():
            raise CheckpointError(f"{p / LATEST}: names {tag}, which is not in {p}")
    elif (p / MANIFEST).is_file() or any(_model_files(p)):
        tag_dir = p
    else:
        raise CheckpointError(f"{p}: not a checkpoint (no '{LATEST}' file and no model-state "
                              "files)")
    verify_checkpoint(tag_dir)
    return tag_dir


def _model_files(tag_dir: Path) -> list[str]:
    return [f.name for f in tag_dir.iterdir()
            if MODEL_STATES.match(f.name) or LAYER_STATES.match(f.name)]


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Find the step directory of ``path`` and the layout and parallel sizes of its files."""
    tag_dir = resolve_checkpoint_dir(path)
    names = [f.name for f in tag_dir.iterdir() if f.is_file()]
    if any(ZERO3_STATES.match(n) for n in names):
        raise CheckpointError(f"{tag_dir}: ZeRO stage 3 checkpoint (partitioned weights); "
                              "reading it is not supported")
    mp_ranks = sorted(int(m.group(1)) for n in names if (m := MODEL_STATES.match(n)))
    layers = [(int(m.group(1)), int(m.group(2))) for n in names if (m := LAYER_STATES.match(n))]
    match = re.match(r"^global_step(\d+)$", tag_dir.name)
    iteration = int(match.group(1)) if match else 0
    if layers:
        tp = len({t for _, t in layers})
        pp = max(1, len(mp_ranks) // tp)
        return CheckpointInfo(tag_dir, "pipeline", tp, pp, iteration)
    if not mp_ranks:
        raise CheckpointError(f"{tag_dir}: no model-state files (mp_rank_XX_model_states.pt or "
                              "layer_XX-model_YY-model_states.pt)")
    if mp_ranks != list(range(len(mp_ranks))):
        raise CheckpointError(f"{tag_dir}: model-state files of tensor-parallel ranks "
                              f"{mp_ranks} (expected 0..{len(mp_ranks) - 1})")
    return CheckpointInfo(tag_dir, "plain", len(mp_ranks), 1, iteration)


# ----------------------------------------------------------------------- reading
def _load(path: Path) -> object:
    return load_file(path)  # weights_only=True: loading runs no code from the file


def read_shard(info: CheckpointInfo, tp_rank: int, model: ModelArgs) -> StateDict:
    """Tensor-parallel rank ``tp_rank``'s weights in ``GPTModel`` names."""
    if not 0 <= tp_rank < info.tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside 0..{info.tp_size - 1}")
    experts = expert_weights(info.tag_dir, tp_rank, _load)  # expert shards of every rank
    return {**_read_engine_shard(info, tp_rank, model), **experts}


def _read_engine_shard(info: CheckpointInfo, tp_rank: int, model: ModelArgs) -> StateDict:
    if info.layout == "plain":
        path = info.tag_dir / f"mp_rank_{tp_rank:02d}_model_states.pt"
        state = _load(path)
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}: no model weights under 'module'")
        return {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
    out: StateDict = {}
    suffix = f"-model_{tp_rank:02d}-model_states.pt"
    files = sorted(f for f in info.tag_dir.iterdir() if f.name.endswith(suffix))
    for path in files:
        match = LAYER_STATES.match(path.name)
        assert match is not None
        layer = _load(path)
        if not isinstance(layer, dict):
            raise CheckpointError(f"{path}: not a state dict")
        for key, tensor in layer.items():
            try:
                name = pipeline_key_to_model_key(f"{int(match.group(1))}.{key}", model)
            except KeyError:
                raise CheckpointError(f"{path}: {key} does not belong to the pipeline of this "
                                      "config (config/architecture mismatch)") from None
            out.setdefault(name, tensor)  # the tied output copy equals the embedding
    return out


def read_model_state_dict(path: str | os.PathLike[str], model: ModelArgs,
                          ) -> tuple[StateDict, CheckpointInfo]:
    """All weights of the checkpoint at ``path`` as full tensors in ``GPTModel`` names."""
    info = inspect_checkpoint(path)
    shards = [read_shard(info, r, model) for r in range(info.tp_size)]
    return merge_tp_shards(shards, model), info


def expand_shared_layers(state_dict: Mapping[str, torch.Tensor], model: ModelArgs) -> StateDict:
    """``layers.{depth}.*`` for every depth of a model with shared layers
    (``num_unique_layers``), whose checkpoint holds ``layers.{unique index}.*`` only."""
    plan = layer_plan(model)
    if len(set(plan)) == len(plan):
        return dict(state_dict)
    out: StateDict = {k: v for k, v in state_dict.items() if not k.startswith("layers.")}
    for depth, unique in enumerate(plan):
        prefix = f"layers.{unique}."
        for key, value in state_dict.items():
            if key.startswith(prefix):
                out[f"layers.{depth}.{key[len(prefix):]}"] = value
    return out


def check_against_model(state_dict: Mapping[str, torch.Tensor],
                        expected: Mapping[str, torch.Tensor], where: str) -> None:
    """One-line error when a checkpoint's entries or shapes differ from what the config
    builds."""
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{where}: does not match the model of the config ({detail}; "
                              "config/architecture mismatch)")
    for key, ref in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: {key} has shape {list(got.shape)}, the config builds "
                                  f"{list(ref.shape)} (config/architecture mismatch)")


# ----------------------------------------------------------------------- writing
def _engine_state(module: StateDict | None, *, mp_world_size: int, tp: int, pp: int,
                  iteration: int) -> dict[str, object]:
    """The entries DeepSpeed's engine saves in a model-state file (no optimizer state, no
    ``lr_scheduler`` entry: the trainer restores its schedule from that entry when present)."""
    try:
        ds_version = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds_version = "unknown"
    return {
        "module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
        "frozen_param_shapes": None, "shared_params": None, "frozen_param_fragments": None,
        "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
        "global_steps": iteration, "global_samples": 0, "dp_world_size": 1,
        "mp_world_size": mp_world_size,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
        "ds_config": {}, "ds_version": ds_version, "iteration": iteration,
    }  # fmt: skip


def pipeline_layer_state_dicts(state_dict: Mapping[str, torch.Tensor],
                               model: ModelArgs) -> dict[int, StateDict]:
    """The keys of every pipeline spec's layer file (``{spec index: state dict}``)."""
    out: dict[int, StateDict] = {}
    for index, entry in enumerate(pipeline_layout(model)):
        if entry.kind == "embed":
            prefix, only = "embed.", None
        elif entry.kind == "rpe":
            prefix, only = "rpe.", None
        elif entry.kind == "layer":
            prefix, only = f"layers.{entry.layer}.", None
        elif entry.kind == "final_norm":
            prefix, only = "final_norm.", None
        elif entry.tied:
            prefix, only = "embed.", "word_embeddings.weight"
        else:
            prefix, only = "output_layer.", None
        layer = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if only is not None:
            layer = {only: layer[only]}
        out[index] = layer
    return out


def _save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_checkpoint(
    save_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    model: ModelArgs,
    *,
    tp_size: int = 1,
    pipe_parallel_size: int = 0,
    config_yaml: str | None = None,
    iteration: int = 0,
) -> Path:
    """Write full ``GPTModel`` weights as a checkpoint the trainer loads (with ``finetune``).

    ``pipe_parallel_size`` 0 writes the plain layout, 1 or more the pipeline layout for that
    many stages (layer files do not depend on the stage count; the ``mp_rank`` files do).
    Returns the step directory; ``latest`` names it once everything is written.
    """
    save = Path(save_dir)
    tag_dir = save / tag_for(iteration)
    (tag_dir / MERGED_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    shards = split_tp({k: v.detach().contiguous() for k, v in state_dict.items()}, model, tp_size)
    if pipe_parallel_size == 0:
        for rank, shard in enumerate(shards):
            _save(_engine_state({k: v.clone() for k, v in shard.items()}, mp_world_size=tp_size,
                                tp=tp_size, pp=1, iteration=iteration),
                  tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
    else:
        for rank, shard in enumerate(shards):
            for index, layer in pipeline_layer_state_dicts(shard, model).items():
                _save({k: v.clone() for k, v in layer.items()},
                      tag_dir / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
        world = pipe_parallel_size * tp_size
        for mp_rank in range(world):
            _save(_engine_state(None, mp_world_size=world, tp=tp_size, pp=pipe_parallel_size,
                                iteration=iteration),
                  tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt")
    if config_yaml is not None:
        (tag_dir / MERGED_CONFIG).write_text(config_yaml)
    write_manifest(tag_dir, iteration, has_optimizer=False)
    atomic_write(save / LATEST, tag_dir.name)
    return tag_dir
