"""LoRA: low-rank adapters on the tensor-parallel linear layers, the base weights frozen.

A targeted layer (``lora_target_modules``, by the last part of its name:
``query_key_value``, ``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``) computes
``x W^T + (alpha / r) * dropout(x) A^T B^T``, ``A [r, in]`` and ``B [out, r]`` (B starts at 0,
so training starts from the base model). Under tensor parallelism the adapter is split like
the weight it adapts:

- column-parallel ``W`` (split on ``out``): ``A`` replicated, ``B`` split on ``out`` with the
  weight's stride; each rank's ``A`` gradient is partial and is summed over the tensor group;
- row-parallel ``W`` (split on ``in``): ``A`` split on ``in``, ``B`` replicated; the layer's
  own all-reduce sums the partial products, and ``B``'s partial gradients are summed.

The adapters are parameters of the layers (``...query_key_value.lora_A``), so checkpoints hold
them; every other parameter is frozen (``requires_grad`` off), so the optimizer holds state for
the adapters only. :func:`merged_state_dict` folds them into the base weights (the same
formula works on one tensor-parallel shard or on full tensors); :func:`peft_adapter` writes them
as a Hugging Face PEFT adapter of the converted GPT-NeoX model.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_parallel_attributes,
    split_tensor,
)
from megatron.parallel.state import ParallelState

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _sum_over_tp(state: ParallelState, grad: torch.Tensor) -> torch.Tensor:
    if state.tp_size > 1:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=state.tp_group)
    return grad


def _lora_linear(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    out = F.linear(x, weight, bias)
    h = F.linear(layer.lora_dropout(x), layer.lora_A)
    return out + layer.lora_scale * F.linear(h, layer.lora_B)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
               targets: list[str] | tuple[str, ...], state: ParallelState,
               seed: int, layer_name: Callable[[str], str] | None = None) -> list[str]:
    """Add adapters to the targeted layers of ``model`` and freeze everything else; returns
    the adapted layers' names. ``A`` is drawn (Kaiming-uniform, from ``seed`` and the layer's
    plain-model name) at full size and split, so any tensor-parallel size starts from the same
    adapter. ``layer_name`` maps a module name of ``model`` to the plain model's (a pipeline
    stage's ``3.attention.dense`` is ``layers.0.attention.dense``), so every pipeline layout
    starts from the same adapters too."""
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"lora_target_modules: {sorted(unknown)} not among {list(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, layer in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets or \
                not isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            continue
        column = isinstance(layer, ColumnParallelLinear)
        dtype, device = layer.weight.dtype, layer.weight.device
        plain = layer_name(name) if layer_name is not None else name
        gen = torch.Generator().manual_seed(seed + sum(map(ord, plain)) * 7919)
        full_a = torch.empty(rank, layer.in_features)
        bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform with a = sqrt(5)
        full_a.uniform_(-bound, bound, generator=gen)
        if column:
            a = full_a
            b = torch.zeros(layer.output_size_per_partition, rank)
        else:
            a = split_tensor(full_a, 1, state.tp_size, state.tp_rank)
            b = torch.zeros(layer.out_features, rank)
        layer.lora_A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        layer.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        tp = state.tp_size > 1
        if column:
            set_tensor_parallel_attributes(layer.lora_A, False)
            set_tensor_parallel_attributes(layer.lora_B, tp, 0, layer.partition_stride)
            replicated = layer.lora_A
        else:
            set_tensor_parallel_attributes(layer.lora_A, tp, 1, 1)
            set_tensor_parallel_attributes(layer.lora_B, False)
            replicated = layer.lora_B
        replicated.register_hook(functools.partial(_sum_over_tp, state))
        layer.lora_scale = alpha / rank
        layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layer.linear_impl = functools.partial(_lora_linear, layer)
        adapted.append(name)
    if not adapted:
        raise ValueError(f"lora_target_modules: no layer named {list(targets)} in the model")
    return adapted


def lora_names(state_dict: Mapping[str, Any]) -> list[str]:
    """The layer prefixes (``layers.0.attention.query_key_value``) holding adapters."""
    return [k[: -len(".lora_A")] for k in state_dict if k.endswith(".lora_A")]


def merged_state_dict(state_dict: Mapping[str, torch.Tensor], *, rank: int,
                      alpha: float) -> dict[str, torch.Tensor]:
    """The plain model's state dict: ``W + (alpha / r) B A`` for every adapted layer, the
    adapters dropped (one tensor-parallel shard or full tensors)."""
    out = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    scale = alpha / rank
    for prefix in lora_names(state_dict):
        a, b = state_dict[prefix + ".lora_A"], state_dict[prefix + ".lora_B"]
        w = state_dict[prefix + ".weight"]
        out[prefix + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def peft_adapter(state_dict: Mapping[str, torch.Tensor], output_dir: str | Path, *,
                 rank: int, alpha: float, dropout: float, targets: list[str],
                 base_model: str = "") -> Path:
    """Write the adapters of a full ``GPTModel`` state dict as a PEFT LoRA adapter of the
    model converted to Hugging Face GPT-NeoX (``adapter_config.json`` +
    ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix in lora_names(state_dict):
        # GPT-NeoX's Hugging Face layout keeps these layers' names and weight layouts
        hf = f"base_model.model.gpt_neox.{prefix}"
        tensors[hf + ".lora_A.weight"] = state_dict[prefix + ".lora_A"].contiguous()
        tensors[hf + ".lora_B.weight"] = state_dict[prefix + ".lora_B"].contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
              "fan_in_fan_out": False, "base_model_name_or_path": base_model,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def full_adapters(shards: list[Mapping[str, torch.Tensor]], model: Any
                  ) -> dict[str, torch.Tensor]:
    """Full ``lora_A``/``lora_B`` tensors from every tensor-parallel rank's state dict: the
    split one of each pair is merged by its weight's rule, the replicated one taken once."""
    from megatron.checkpoint.reshard import partition_of, split_rules
    from megatron.parallel.layers import merge_shards

    out: dict[str, torch.Tensor] = {}
    rules = split_rules(model) if len(shards) > 1 else None
    for prefix in lora_names(shards[0]):
        a, b = prefix + ".lora_A", prefix + ".lora_B"
        if rules is None:
            out[a], out[b] = shards[0][a], shards[0][b]
            continue
        part = partition_of(prefix + ".weight", model, rules)
        split = b if part.dim == 0 else a  # column-parallel: B; row-parallel: A
        for name in (a, b):
            out[name] = merge_shards([s[name] for s in shards], part.dim, part.stride) \
                if name == split else shards[0][name]
    return out


def export_checkpoint(load: str, model: Any, *, rank: int, alpha: float, dropout: float,
                      targets: list[str], merged_dir: str | None = None,
                      peft_dir: str | None = None) -> list[str]:
    """From a LoRA training checkpoint: a plain checkpoint with the adapters merged into the
    weights (which the trainer, generation and the Hugging Face conversion load) and/or a PEFT
    adapter of the converted GPT-NeoX model. Returns what was written."""
    from megatron.checkpoint.reshard import merge_tp_shards
    from megatron.checkpoint.weights import inspect_checkpoint, read_shard, write_checkpoint

    info = inspect_checkpoint(load)
    shards = [read_shard(info, r, model) for r in range(info.tp_size)]
    if not lora_names(shards[0]):
        raise ValueError(f"{info.tag_dir}: no LoRA adapters in the checkpoint")
    written = []
    if merged_dir:
        merged = [merged_state_dict(s, rank=rank, alpha=alpha) for s in shards]
        full = merge_tp_shards(merged, model)
        written.append(str(write_checkpoint(merged_dir, full, model,
                                            iteration=info.iteration)))
    if peft_dir:
        written.append(str(peft_adapter(full_adapters(shards, model), peft_dir, rank=rank,
                                        alpha=alpha, dropout=dropout, targets=targets)))
    return written


def export_main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Export the LoRA adapters of a checkpoint: merged "
                                "into the weights and/or as a Hugging Face PEFT adapter.")
    p.add_argument("--input_dir", required=True, help="the checkpoint (directory or step)")
    p.add_argument("--config_file", nargs="+", required=True, help="the training config")
    p.add_argument("--merged_dir", help="write a plain checkpoint with the adapters merged")
    p.add_argument("--peft_dir", help="write a PEFT adapter (adapter_config.json + "
                   "adapter_model.safetensors) of the model converted with --architecture neox")
    args = p.parse_args(argv)
    if not (args.merged_dir or args.peft_dir):
        p.error("give --merged_dir and/or --peft_dir")
    from megatron.conversion.neox_to_hf import load_neox_config
    from megatron.neox_arguments import ConfigError

    try:
        cfg = load_neox_config(args.config_file)
        pt = cfg.posttrain
        if pt.lora_rank <= 0:
            raise ValueError(f"{args.config_file[0]}: lora_rank is not set")
        for line in export_checkpoint(
                args.input_dir, cfg.model, rank=pt.lora_rank, alpha=pt.lora_alpha,
                dropout=pt.lora_dropout, targets=list(pt.lora_target_modules),
                merged_dir=args.merged_dir, peft_dir=args.peft_dir):
            print(f"wrote {line}")
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
