"""Expert shards in checkpoints.

Under expert parallelism (``expert_model_parallel_size`` ep > 1) each rank holds ``E / ep``
experts of every MoE layer (:mod:`megatron.model.moe`), so the files DeepSpeed writes from the
first data-parallel rank hold only that rank's experts. Every checkpoint written with ep > 1
therefore also holds, from each rank that is first among the replicas of its experts (the
first rank of its expert-data-parallel group)::

    global_stepN/experts/rank_00001.pt   {DeepSpeed parameter name: {"weight": fp32 tensor,
                                          optimizer moment name: tensor, ...}}

with the full (not ZeRO-partitioned) fp32 weight and optimizer moments of its expert shards.
The rank files of :mod:`megatron.checkpoint.relayout` record each rank's expert-parallel rank
and which of its parameters are expert shards. A checkpoint with expert shards, or a run with
them, always loads through :func:`~megatron.checkpoint.relayout.load_at_new_layout`: the shards
of the expert-parallel ranks are concatenated along the expert dimension into every expert
(:func:`read_expert_shards`), and each rank of the new layout takes its experts
(:func:`local_experts`) before the tensor-parallel split, so a checkpoint resumes at any
expert-parallel size (1 included) as at any other layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron.parallel.experts import is_expert_parameter

EXPERT_DIR = "experts"


def expert_file(rank: int) -> str:
    return f"{EXPERT_DIR}/rank_{rank:05d}.pt"


def expert_parameters(engine: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, param in engine.module.named_parameters():
        if is_expert_parameter(param):
            yield name, param


def _moment_keys(engine: Any) -> list[str]:
    """Names of the per-element optimizer state tensors (``exp_avg``, ...), if any exist."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt) if engine.zero_optimization_stage() > 0 else opt
    for entry in getattr(base, "state", {}).values():
        return [k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return []


def link_optimizer_fragments(params: list[Any], state: dict[str, Any], keys: list[str]) -> None:
    """Point the optimizer-state fragment of every ZeRO 1/2 parameter in ``params`` at its part
    of its flat fp32 partition's ``state`` (the ``keys`` present there): DeepSpeed links only
    the keys present when it first looks."""
    for lp in params:
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is None:
            continue
        if mapping.optim_fragment is None:
            mapping.optim_fragment = {}
        address = mapping.get_hp_fragment_address()
        for key in keys:
            if key in state:
                mapping.optim_fragment[key] = state[key].narrow(0, address.start, address.numel)


def _link_moments(zero_opt: Any, keys: list[str]) -> None:
    """Link every ZeRO 1/2 parameter's fragments to the current state of its partition."""
    for flat, params in zip(zero_opt.single_partition_of_fp32_groups, zero_opt.bit16_groups,
                            strict=True):
        link_optimizer_fragments(params, zero_opt.optimizer.state.get(flat, {}), keys)


def expert_state(engine: Any) -> dict[str, dict[str, torch.Tensor]] | None:
    """The full fp32 weights and optimizer moments of this rank's expert shards (None
    without any). Collective over the expert-data-parallel group under ZeRO 1/2, where the
    shards are partitioned: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    experts = list(expert_parameters(engine))
    if not experts:
        return None
    zero = engine.zero_optimization_stage()
    keys = _moment_keys(engine)
    if zero > 0 and keys:
        _link_moments(engine.optimizer, keys)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in experts:
        master = safe_get_full_fp32_param(param)
        entry = {"weight": (master if master is not None else param.detach()).float().cpu()}
        if zero > 0:
            for key in keys:
                value = safe_get_full_optimizer_state(param, key)
                if value is not None:
                    entry[key] = value.cpu()
        else:
            for key, value in engine.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    entry[key] = value.detach().cpu()
        out[name] = {k: v.clone() for k, v in entry.items()}
    return out


def writes_expert_file(engine: Any) -> bool:
    """Whether this rank is first among the replicas of its experts (it writes them)."""
    from deepspeed.utils import groups

    experts = list(expert_parameters(engine))
    if not experts:
        return False
    group = groups._get_expert_data_parallel_group(experts[0][1].group_name)
    return torch.distributed.get_rank(group=group) == 0


def read_expert_shards(tag_dir: Path, recs: list[dict[str, Any]], load: Any,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Every expert of one tensor/pipeline coordinate (``recs``: its ranks) as full tensors in
    ``GPTModel`` names: the weights and the optimizer moments by moment name."""
    owners: dict[int, dict[str, Any]] = {}
    for rec in recs:
        if rec.get("expert_names"):
            owners.setdefault(int(rec.get("ep_rank", 0)), rec)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    for ep_rank in sorted(owners):
        rec = owners[ep_rank]
        shard = load(tag_dir / expert_file(int(rec["rank"])))
        for ds_name, entry in shard.items():
            for key, tensor in entry.items():
                parts.setdefault(key, {}).setdefault(rec["names"][ds_name], []).append(tensor)
    full = {key: {name: torch.cat(pieces) for name, pieces in by_name.items()}
            for key, by_name in parts.items()}
    return full.pop("weight", {}), full


def expert_weights(tag_dir: Path, tp_rank: int, load: Any) -> dict[str, torch.Tensor]:
    """Every expert's weights of tensor-parallel rank ``tp_rank`` (all pipeline stages) in
    ``GPTModel`` names, from the expert files of a checkpoint; empty when it has none."""
    if not (tag_dir / EXPERT_DIR).is_dir():
        return {}
    recs = [json.loads(p.read_text()) for p in sorted((tag_dir / "layout").glob("*.json"))]
    out: dict[str, torch.Tensor] = {}
    for pp_rank in sorted({int(r["pp_rank"]) for r in recs}):
        mine = [r for r in recs if r["tp_rank"] == tp_rank and r["pp_rank"] == pp_rank]
        out.update(read_expert_shards(tag_dir, mine, load)[0])
    return out


def local_experts(full: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    """This expert-parallel rank's experts of a tensor holding every expert (dim 0)."""
    if ep == 1:
        return full
    per_rank = full.shape[0] // ep
    return full.narrow(0, ep_rank * per_rank, per_rank)
