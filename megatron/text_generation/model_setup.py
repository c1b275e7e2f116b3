"""The plain ``GPTModel`` loaded from the checkpoint named by ``load``, for inference.

Used by generate.py and eval.py. Whatever ``pipe_parallel_size`` says, inference builds the
plain model (no pipeline engine, no DeepSpeed engine) on this rank's tensor-parallel shards,
without sequence parallelism, and fills it from ``load``'s latest complete checkpoint: the
rank's own ``mp_rank`` / ``layer_*-model_{tp}`` files when the checkpoint has this run's tensor
parallel size, otherwise all shards merged and re-split (see :mod:`megatron.checkpoint.reshard`).
With ``pipe_parallel_size > 1`` every pipeline rank holds the whole model and computes the same
thing; launch ``model_parallel_size`` ranks (``--pipe_parallel_size 0``) to avoid the copies.
The model is cast to the run's precision (bf16 / fp16) and put in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron.checkpoint.reshard import shard_state_dict
from megatron.checkpoint.weights import (
    CheckpointInfo,
    check_against_model,
    inspect_checkpoint,
    read_model_state_dict,
    read_shard,
)
from megatron.model.gpt import GPTModel
from megatron.neox_arguments import ConfigError, NeoXConfig
from megatron.parallel.state import ParallelState


def load_weights(model: GPTModel, cfg: NeoXConfig, state: ParallelState,
                 load: str) -> CheckpointInfo:
    """Fill ``model`` (built for ``state``'s tensor-parallel rank) from checkpoint ``load``."""
    info = inspect_checkpoint(load)
    if info.tp_size == state.tp_size:
        shard = read_shard(info, state.tp_rank, cfg.model)
    else:
        full, _ = read_model_state_dict(load, cfg.model)
        shard = shard_state_dict(full, cfg.model, state.tp_size, state.tp_rank)
    expected = model.state_dict()
    check_against_model(shard, expected, str(info.tag_dir))
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(shard[name])
    return info


def load_inference_model(
    cfg: NeoXConfig,
    state: ParallelState,
    device: torch.device,
    *,
    tracker: Any = None,
    log: Callable[[str], None] = print,
) -> GPTModel:
    """The model of ``cfg`` with the weights of ``cfg.checkpoint.load``, ready for inference."""
    load = cfg.checkpoint.load
    if not load:
        raise ConfigError("load: not set; generation and evaluation need a checkpoint directory")
    assert cfg.tokenizer.padded_vocab_size is not None
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state, tracker=tracker, sequence_parallel=False)
    info = load_weights(model, cfg, state, load)
    dtype = getattr(torch, cfg.params_dtype_name)
    model.to(device=device, dtype=dtype)
    model.eval()
    log(f"loaded {info.layout} checkpoint {info.tag_dir} (iteration {info.iteration}, tensor "
        f"parallel {info.tp_size}{', resharded' if info.tp_size != state.tp_size else ''}) "
        f"into the plain model, {dtype}")
    return model
