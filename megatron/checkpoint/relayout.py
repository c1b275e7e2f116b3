"""Resuming at another parallel layout: tensor, pipeline and data-parallel sizes and ZeRO stage.

Every checkpoint records the layout that wrote it and the shape of its model::

    global_stepN/layout.json             tp, pp, dp, ZeRO stage, world size, model shape
    global_stepN/layout/rank_00000.json  per rank: its coordinates, the DeepSpeed files it wrote
                                         and its parameters (DeepSpeed name -> GPTModel name, in
                                         the optimizer's order)

On load (:func:`read_layout`, :func:`check_model_shape`) a changed model shape stops with one
line; an unchanged layout loads through the DeepSpeed engine as before; a changed layout goes
through :func:`load_at_new_layout`, which reads the checkpoint's files at the layout that wrote
them into full tensors (model weights or fp32 master weights and every optimizer moment, in
``GPTModel`` names) and gives each parameter of the new engine its part:

* reading: the model files of ZeRO 0 (``module`` and the torch optimizer's ``state_dict``), the
  fragment addresses ZeRO 1/2 save with their flat fp32 partitions (``param_slice_mappings``),
  and ZeRO 3's per-parameter partitions (``param_shapes`` with ``fp32_flat_groups``, as
  DeepSpeed's ``zero_to_fp32`` reads them); tensor-parallel shards merge with the split rules
  of the layers (:mod:`megatron.checkpoint.reshard`);
* writing: DeepSpeed's tensor-fragment interface (``safe_set_full_fp32_param``,
  ``safe_set_full_optimizer_state``, the per-parameter interface of its universal checkpoints)
  for ZeRO 1-3, the torch optimizer's ``state`` for ZeRO 0.

The LR schedule, consumed samples and iteration come from the client state of the checkpoint;
each new rank takes the RNG states of an old rank with matching coordinates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint.experts import (
    expert_parameters,
    link_optimizer_fragments,
    local_experts,
    read_expert_shards,
)
from megatron.checkpoint.manifest import CheckpointError, atomic_write
from megatron.checkpoint.reshard import REPLICATED, merge_tp_shards, split_rules
from megatron.checkpoint.safe_load import load_file
from megatron.checkpoint.weights import CheckpointInfo, read_shard
from megatron.model.args import ModelArgs
from megatron.model.pipeline import pipeline_key_to_model_key
from megatron.parallel.experts import is_expert_parameter
from megatron.parallel.layers import split_tensor

LAYOUT_FILE = "layout.json"
RANK_DIR = "layout"
#: entries of a DeepSpeed model-state file that are not the trainer's client state
ENGINE_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
    "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions"})
#: model settings that must not change between the run that saved and the run that loads
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
              "padded_vocab_size", "activation", "norm", "pos_emb", "no_weight_tying")


# ----------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Layout:
    """How a run is spread over its ranks (``pp`` 0: the plain model, no pipeline engine)."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    ep: int = 1  # expert-parallel size

    def describe(self) -> str:
        pp = "none" if self.pp == 0 else str(self.pp)
        ep = f" EP={self.ep}" if self.ep > 1 else ""
        return f"TP={self.tp} PP={pp} DP={self.dp}{ep} ZeRO-{self.zero_stage}"


@dataclass(frozen=True)
class RunLayout:
    """The layout of the running job and what this rank is in it."""

    layout: Layout
    model: ModelArgs
    shape: dict[str, Any]
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    ep_rank: int = 0


def model_shape(model: ModelArgs, padded_vocab_size: int | None) -> dict[str, Any]:
    """The settings of ``model`` that decide its parameters' shapes (:data:`SHAPE_KEYS`)."""
    values = {k: getattr(model, k, None) for k in SHAPE_KEYS if k != "padded_vocab_size"}
    if values.get("num_kv_heads") is None:
        values["num_kv_heads"] = model.num_attention_heads
    values["padded_vocab_size"] = padded_vocab_size
    return {k: values[k] for k in SHAPE_KEYS}


def run_layout(cfg: Any, state: Any) -> RunLayout:
    """The :class:`RunLayout` of a training run from its config and parallel state."""
    zero = int((cfg.ds.zero_optimization or {}).get("stage", 0))
    pp = cfg.parallelism.pipe_parallel_size if cfg.parallelism.is_pipe_parallel else 0
    layout = Layout(tp=state.tp_size, pp=pp, dp=state.dp_size, zero_stage=zero,
                    ep=state.ep_size)
    return RunLayout(layout, cfg.model, model_shape(cfg.model, cfg.tokenizer.padded_vocab_size),
                     rank=state.rank, tp_rank=state.tp_rank, pp_rank=state.pp_rank,
                     dp_rank=state.dp_rank, ep_rank=state.ep_rank)


# ----------------------------------------------------------------------------- recording
def _gpt_name(name: str, run: RunLayout) -> str:
    return pipeline_key_to_model_key(name, run.model) if run.layout.pp else name


def write_layout(tag_dir: Path, engine: Any, run: RunLayout) -> None:
    """Record this rank's part of the checkpoint (every rank) and the layout (rank 0)."""
    module = engine.module
    names = {n: _gpt_name(n, run) for n, _ in module.named_parameters()}
    by_id = {id(p): n for n, p in module.named_parameters()}
    order: list[str] = []
    if run.layout.zero_stage == 0 and engine.optimizer is not None:
        groups = getattr(engine.optimizer, "param_groups", [])
        order = [by_id[id(p)] for g in groups for p in g["params"] if id(p) in by_id]
    save_dir, tag = str(tag_dir.parent), tag_dir.name
    optim_file = None
    if run.layout.zero_stage > 0:
        optim_file = os.path.basename(engine._get_zero_ckpt_name(save_dir, tag))
    record = {
        "rank": run.rank, "tp_rank": run.tp_rank, "pp_rank": run.pp_rank,
        "dp_rank": run.dp_rank,
        "model_file": os.path.basename(engine._get_ckpt_name(save_dir, tag)),
        "optim_file": optim_file, "names": names, "optimizer_order": order,
        "ep_rank": run.ep_rank, "expert_names": [n for n, _ in expert_parameters(engine)],
    }
    rank_dir = tag_dir / RANK_DIR
    rank_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(rank_dir / f"rank_{run.rank:05d}.json", json.dumps(record))
    if run.rank == 0:
        world = run.layout.tp * max(run.layout.pp, 1) * run.layout.dp
        info = {**asdict(run.layout), "world_size": world, "model": run.shape}
        atomic_write(tag_dir / LAYOUT_FILE, json.dumps(info, indent=1))


@dataclass(frozen=True)
class SavedLayout:
    layout: Layout
    shape: dict[str, Any]
    ranks: list[dict[str, Any]]


def read_layout(tag_dir: Path) -> SavedLayout | None:
    """The layout a checkpoint records (None for checkpoints written before it was recorded)."""
    path = tag_dir / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        layout = Layout(*(int(info[k]) for k in ("tp", "pp", "dp", "zero_stage")),
                        ep=int(info.get("ep", 1)))
        shape = dict(info["model"])
        ranks = [json.loads(p.read_text()) for p in sorted((tag_dir / RANK_DIR).glob("*.json"))]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable layout metadata ({type(exc).__name__}: "
                              f"{exc})") from None
    world = layout.tp * max(layout.pp, 1) * layout.dp
    if layout.tp < 1 or layout.dp < 1 or layout.pp < 0 or not 0 <= layout.zero_stage <= 3:
        raise CheckpointError(f"{path}: invalid layout {asdict(layout)}")
    if len(ranks) != world:
        raise CheckpointError(f"{path}: records {world} ranks ({layout.describe()}) but "
                              f"{tag_dir / RANK_DIR} holds {len(ranks)} rank files")
    return SavedLayout(layout, shape, ranks)


def check_model_shape(tag_dir: Path, saved: SavedLayout, shape: Mapping[str, Any]) -> None:
    """One line naming the checkpoint, the key and both values when the model changed."""
    for key in SHAPE_KEYS:
        if key in saved.shape and saved.shape[key] != shape.get(key):
            raise CheckpointError(
                f"{tag_dir}: {key} is {saved.shape[key]!r} in the checkpoint but "
                f"{shape.get(key)!r} in the config: the model shape changed, the checkpoint "
                "cannot be loaded")


def rng_source_rank(saved: SavedLayout, run: RunLayout) -> int:
    """The old rank whose RNG states this rank takes: same tensor, pipeline and data-parallel
    coordinates, each modulo the old size."""
    old = saved.layout
    want = (run.tp_rank % old.tp, run.pp_rank % max(old.pp, 1), run.dp_rank % old.dp)
    for rec in saved.ranks:
        if (rec["tp_rank"], rec["pp_rank"], rec["dp_rank"]) == want:
            return int(rec["rank"])
    return 0


def parse_state_dict_error(tag_dir: Path, message: str) -> str | None:
    """One line from torch's ``Error(s) in loading state_dict`` message: the first entry that
    does not fit, with both shapes."""
    for line in message.splitlines():
        text = line.strip()
        if text.startswith("size mismatch for "):
            name, _, rest = text[len("size mismatch for "):].partition(":")
            shapes = [s.split(")")[0] for s in rest.split("torch.Size(")[1:]]
            if len(shapes) == 2:
                return (f"{tag_dir}: {name} has shape {shapes[0]} in the checkpoint but "
                        f"{shapes[1]} in the model of the config (config/architecture mismatch)")
            return f"{tag_dir}: {text}"
        for head in ("Missing key(s) in state_dict:", "Unexpected key(s) in state_dict:"):
            if text.startswith(head):
                first = text[len(head):].split(",")[0].strip().strip('"')
                what = "missing from the checkpoint" if head.startswith("Missing") else \
                    "in the checkpoint but not in the model of the config"
                return f"{tag_dir}: {first} is {what} (config/architecture mismatch)"
    return None


# ----------------------------------------------------------------------------- reading
def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    # DeepSpeed's files hold a few data-only objects of its own (loss scaler, fragment
    # addresses): load_file allows those and nothing that could run code
    return load_file(path)


@dataclass
class FullState:
    """A checkpoint's state independent of layout, in ``GPTModel`` names."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]  # state key -> name -> full tensor
    scalars: dict[str, Any]  # per-parameter optimizer entries that are not tensors (step)
    client_state: dict[str, Any]


def _add_moments(out: dict[str, dict[str, torch.Tensor]], name: str,
                 values: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in values.items():
        out.setdefault(key, {}).setdefault(name, tensor)


def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state entry's per-element tensors (moments) and its scalars (step)."""
    tensors, scalars = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            tensors[key] = value
        else:
            scalars[key] = value
    return tensors, scalars


class _Slot:
    """The local (one tensor- and pipeline-parallel rank's) tensors of a checkpoint."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.moments: dict[str, dict[str, torch.Tensor]] = {}
        self.scalars: dict[str, Any] = {}


def _read_modules(tag_dir: Path, rec: dict[str, Any], slot: _Slot) -> None:
    """The model weights of a plain-layout model file (pipeline files hold none)."""
    module = _load(tag_dir / rec["model_file"]).get("module")
    skip = set(rec.get("expert_names", ()))  # read from the expert files
    if isinstance(module, dict):
        for name, tensor in module.items():
            if name in rec["names"] and name not in skip:
                slot.weights.setdefault(rec["names"][name], tensor)


def _read_zero0(tag_dir: Path, rec: dict[str, Any], slot: _Slot) -> None:
    """The torch optimizer's state dict in a ZeRO-0 model file."""
    opt = _load(tag_dir / rec["model_file"]).get("optimizer")
    if not isinstance(opt, dict) or "state" not in opt:
        return
    indices = [i for g in opt.get("param_groups", []) for i in g["params"]]
    order = rec["optimizer_order"]
    if len(indices) != len(order):
        raise CheckpointError(f"{tag_dir / rec['model_file']}: optimizer state of "
                              f"{len(indices)} parameters, the layout records {len(order)}")
    skip = set(rec.get("expert_names", ()))
    for index, ds_name in zip(indices, order, strict=True):
        entry = opt["state"].get(index)
        if entry and ds_name not in skip:
            tensors, scalars = _split_state(entry)
            _add_moments(slot.moments, rec["names"][ds_name], tensors)
            for k, v in scalars.items():
                slot.scalars.setdefault(k, v)


def _read_zero12(tag_dir: Path, recs: list[dict[str, Any]], slot: _Slot) -> None:
    """fp32 master weights and moments of ZeRO 1/2 (``recs``: the data-parallel ranks of one
    tensor/pipeline coordinate, in dp order)."""
    shapes: dict[str, torch.Size] = {}
    for group in _load(tag_dir / recs[0]["model_file"]).get("param_shapes") or []:
        shapes.update(group)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for rec in recs:
        osd = _load(tag_dir / rec["optim_file"])["optimizer_state_dict"]
        fp32 = osd["single_partition_of_fp32_groups"]
        base = osd["base_optimizer_state"]
        base_state = base.get("state", base) if isinstance(base, dict) else {}
        skip = set(rec.get("expert_names", ()))
        for gi, mapping in enumerate(osd["param_slice_mappings"]):
            tensors, scalars = _split_state(base_state.get(gi, {}))
            for k, v in scalars.items():
                slot.scalars.setdefault(k, v)
            for ds_name, addr in mapping.items():
                if ds_name in skip:
                    continue
                mine = pieces.setdefault(ds_name, {})
                mine.setdefault("fp32", []).append(fp32[gi].narrow(0, addr.start, addr.numel))
                for key, flat in tensors.items():
                    mine.setdefault(key, []).append(flat.narrow(0, addr.start, addr.numel))
    names = recs[0]["names"]
    for ds_name, parts in pieces.items():
        shape = shapes[ds_name]
        full = {k: torch.cat(v).view(shape) for k, v in parts.items()}
        slot.weights[names[ds_name]] = full.pop("fp32")  # the master over its copy
        _add_moments(slot.moments, names[ds_name], full)


def _read_zero3(tag_dir: Path, recs: list[dict[str, Any]], slot: _Slot,
                with_optim: bool) -> None:
    dp = len(recs)
    shapes: list[tuple[str, torch.Size]] = []
    for group in _load(tag_dir / recs[0]["model_file"]).get("param_shapes") or []:
        shapes.extend(group.items())
    flats: dict[str, list[torch.Tensor]] = {"fp32": []}
    for rec in recs:
        osd = _load(tag_dir / rec["optim_file"])["optimizer_state_dict"]
        flats["fp32"].append(torch.cat([g.flatten() for g in osd["fp32_flat_groups"]]))
        state = osd["optimizer_state_dict"].get("state", {}) if with_optim else {}
        groups = [state[i] for i in sorted(state)]
        if groups:
            tensors, scalars = _split_state(groups[0])
            for k, v in scalars.items():
                slot.scalars.setdefault(k, v)
            for key in tensors:
                flats.setdefault(key, []).append(torch.cat([g[key].flatten() for g in groups]))
    names = recs[0]["names"]
    offset = 0
    for ds_name, shape in shapes:
        numel = int(torch.Size(shape).numel())
        part = -(-numel // dp)
        full = {k: torch.cat([f.narrow(0, offset, part) for f in v])[:numel].view(shape)
                for k, v in flats.items() if len(v) == dp}
        offset += part
        slot.weights.setdefault(names[ds_name], full.pop("fp32"))
        _add_moments(slot.moments, names[ds_name], full)


def read_full_state(tag_dir: Path, saved: SavedLayout, model: ModelArgs, *,
                    with_optim: bool) -> FullState:
    """Every tensor of the checkpoint as full ``GPTModel`` tensors."""
    old = saved.layout
    slots = [_Slot() for _ in range(old.tp)]
    for pp_rank in range(max(old.pp, 1)):
        for tp_rank in range(old.tp):
            recs = sorted((r for r in saved.ranks
                           if r["tp_rank"] == tp_rank and r["pp_rank"] == pp_rank),
                          key=lambda r: r["dp_rank"])
            if not recs:
                raise CheckpointError(f"{tag_dir / RANK_DIR}: no rank file for tensor rank "
                                      f"{tp_rank}, pipeline rank {pp_rank}")
            slot = slots[tp_rank]
            if old.zero_stage == 3:
                _read_zero3(tag_dir, recs, slot, with_optim)
                continue
            weights, moments = read_expert_shards(tag_dir, recs, _load)
            slot.weights.update(weights)
            if with_optim:
                for key, by_name in moments.items():
                    slot.moments.setdefault(key, {}).update(by_name)
            _read_modules(tag_dir, recs[0], slot)
            if with_optim and old.zero_stage == 0:
                _read_zero0(tag_dir, recs[0], slot)
            elif with_optim:
                _read_zero12(tag_dir, recs, slot)
    if old.pp > 0:  # pipeline weights live in the layer files (ZeRO 1/2 hold fp32 masters)
        info = CheckpointInfo(tag_dir, "pipeline", old.tp, old.pp, 0)
        for tp_rank, slot in enumerate(slots):
            for name, tensor in read_shard(info, tp_rank, model).items():
                slot.weights.setdefault(name, tensor)
    weights = merge_tp_shards([s.weights for s in slots], model)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key in slots[0].moments:
        moments[key] = merge_tp_shards([s.moments.get(key, {}) for s in slots], model)
    rank0 = next(r for r in saved.ranks if r["rank"] == 0)
    engine_state = _load(tag_dir / rank0["model_file"])
    client = {k: v for k, v in engine_state.items() if k not in ENGINE_KEYS}
    return FullState(weights, moments, dict(slots[0].scalars), client)


# ----------------------------------------------------------------------------- writing
def _local(full: torch.Tensor, name: str, rules: Any, run: RunLayout,
           shape: torch.Size, where: Path) -> torch.Tensor:
    part = rules.get(name, REPLICATED)
    tensor = full
    if part.dim is not None and run.layout.tp > 1:
        try:
            tensor = split_tensor(full, part.dim, run.layout.tp, run.tp_rank, part.stride)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {name}: cannot split {list(full.shape)} over "
                                  f"tensor parallel {run.layout.tp} ({exc})") from None
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {name} has shape {list(tensor.shape)} in the "
                              f"checkpoint but {list(shape)} in the model of the config "
                              "(config/architecture mismatch)")
    return tensor


def _set_zero3_weight(param: torch.nn.Parameter, local: torch.Tensor) -> None:
    part = param.ds_tensor
    size = part.numel()
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    flat = local.flatten().to(part.dtype)
    padded = torch.zeros(size * torch.distributed.get_world_size(group=param.ds_process_group),
                         dtype=part.dtype)
    padded[: flat.numel()] = flat
    part.data.copy_(padded[rank * size:(rank + 1) * size].view_as(part))


def _scalar(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _prime_zero12_states(zero_opt: Any, keys: list[str], scalars: Mapping[str, Any]) -> None:
    """ZeRO 1/2 create the optimizer state of their flat fp32 partitions at the first step:
    create it now (zeros, the saved step) and point every parameter's fragment at its part,
    so that ``safe_set_full_optimizer_state`` can fill it."""
    base = zero_opt.optimizer
    for flat, params in zip(zero_opt.single_partition_of_fp32_groups, zero_opt.bit16_groups,
                            strict=True):
        state = base.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        for key, value in scalars.items():
            state[key] = _scalar(value)
        link_optimizer_fragments(params, state, keys)


def _prime_zero3_states(zero_opt: Any, keys: list[str], scalars: Mapping[str, Any]) -> None:
    """ZeRO 3 also creates the state of its fp32 partitions at the first step: create it."""
    for flat in zero_opt.fp32_partitioned_groups_flat:
        state = zero_opt.optimizer.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        for key, value in scalars.items():
            state[key] = _scalar(value)


def _set_zero3_part(zero_opt: Any, param: Any, local: torch.Tensor, key: str | None) -> None:
    """This rank's part of ``local`` into ZeRO 3's fp32 master (``key`` None) or state."""
    part, _ = zero_opt._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                     optim_state_key=key)
    rank = zero_opt._get_param_partition_rank(param)
    flat = local.flatten().float()
    size = part.numel()
    padded = torch.zeros(max(flat.numel(), (rank + 1) * size), dtype=flat.dtype)
    padded[: flat.numel()] = flat
    part.data.copy_(padded[rank * size:(rank + 1) * size])


def apply_full_state(engine: Any, full: FullState, run: RunLayout, tag_dir: Path, *,
                     with_optim: bool, fresh_prefixes: tuple[str, ...] = (),
                     fresh_names: list[str] | None = None) -> None:
    """Give every parameter of ``engine`` (built at ``run``'s layout) its part of ``full``;
    a parameter under ``fresh_prefixes`` that ``full`` lacks keeps its initial value (its
    name is added to ``fresh_names``)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    rules = split_rules(run.model) if run.layout.tp > 1 else {}
    zero = run.layout.zero_stage
    if with_optim and zero in (1, 2) and full.moments:
        _prime_zero12_states(engine.optimizer, list(full.moments), full.scalars)
    if with_optim and zero == 3 and full.moments:
        _prime_zero3_states(engine.optimizer, list(full.moments), full.scalars)
    seen: set[str] = set()
    for ds_name, param in engine.module.named_parameters():
        name = _gpt_name(ds_name, run)
        if name not in full.weights and fresh_prefixes and name.startswith(fresh_prefixes):
            if fresh_names is not None:
                fresh_names.append(name)
            continue
        if name not in full.weights:
            raise CheckpointError(f"{tag_dir}: {name} is missing from the checkpoint "
                                  "(config/architecture mismatch)")
        seen.add(name)
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        ep = run.layout.ep if is_expert_parameter(param) else 1  # its experts, then its TP part
        local = _local(local_experts(full.weights[name], ep, run.ep_rank), name, rules, run,
                       shape, tag_dir)
        with torch.no_grad():
            if zero == 3:
                _set_zero3_weight(param, local)
                _set_zero3_part(engine.optimizer, param, local, None)
            else:
                param.data.copy_(local.to(param.dtype))
            if zero in (1, 2):
                safe_set_full_fp32_param(param, local.float())
        if not with_optim:
            continue
        moments = {k: _local(local_experts(v[name], ep, run.ep_rank), name, rules, run, shape,
                             tag_dir)
                   for k, v in full.moments.items() if name in v}
        if zero == 3:
            for key, value in moments.items():
                _set_zero3_part(engine.optimizer, param, value, key)
        elif zero > 0:
            for key, value in moments.items():
                safe_set_full_optimizer_state(param, value.float(), key)
        elif moments:
            state = engine.optimizer.state[param]
            for key, value in moments.items():
                state[key] = value.clone().to(param.device)
            for key, value in full.scalars.items():
                state[key] = _scalar(value)
    extra = sorted(set(full.weights) - seen)
    if extra and run.layout.pp == 0:  # a pipeline stage holds only its own layers
        raise CheckpointError(f"{tag_dir}: {extra[0]} is in the checkpoint but not in the model "
                              "of the config (config/architecture mismatch)")


def load_at_new_layout(engine: Any, tag_dir: Path, saved: SavedLayout, run: RunLayout, *,
                       load_optimizer: bool, log: Callable[[str], None],
                       fresh_prefixes: tuple[str, ...] = (),
                       fresh_names: list[str] | None = None) -> dict[str, Any]:
    """Load ``tag_dir`` (written at ``saved``'s layout) into ``engine`` (``run``'s layout);
    returns the client state."""
    if run.rank == 0 and saved.layout != run.layout:
        log(f"{tag_dir} was written at {saved.layout.describe()}; resuming at "
            f"{run.layout.describe()}: resharding the model"
            f"{' and optimizer' if load_optimizer else ''} state")
    full = read_full_state(tag_dir, saved, run.model, with_optim=load_optimizer)
    apply_full_state(engine, full, run, tag_dir, with_optim=load_optimizer,
                     fresh_prefixes=fresh_prefixes, fresh_names=fresh_names)
    client = full.client_state
    if "iteration" in client:
        engine.global_steps = int(client["iteration"])
    if "consumed_train_samples" in client:
        engine.global_samples = int(client["consumed_train_samples"])
    return client
