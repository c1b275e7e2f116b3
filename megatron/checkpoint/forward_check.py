"""Checking a checkpoint with a forward pass (``checkpoint_validation_with_forward_pass``).

As in GPT-NeoX: when a checkpoint is saved, the logits of a fixed input (the token ids
``0 .. seq_length-1``, one row per micro-batch sample, the model in eval mode) are stored with
it (client state ``checkpoint_validation_logits``, the first row, the full vocabulary); when a
checkpoint is loaded, the same forward pass runs on the loaded model and its logits must be
close to the stored ones (``torch.isclose``), or the load fails with one line. A checkpoint
saved without them is loaded with a warning line.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.parallel.mappings import all_gather_dim, group_size
from megatron.parallel.state import ParallelState

CLIENT_KEY = "checkpoint_validation_logits"


@torch.no_grad()
def validation_logits(module: Any, *, seq_length: int, micro_batch: int, vocab_size: int,
                      state: ParallelState, device: torch.device) -> torch.Tensor:
    """The logits of the fixed input (first row, on the CPU, vocabulary padding dropped)."""
    was_training = module.training
    module.eval()
    try:
        tokens = (torch.arange(seq_length, device=device) % vocab_size).repeat(micro_batch, 1)
        positions = torch.arange(seq_length, device=device).repeat(micro_batch, 1)
        logits = module(tokens, position_ids=positions, attention_mask=None)
    finally:
        if was_training:
            module.train()
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = logits[:1].float()
    group = state.tp_group
    if group is not None and group_size(group) > 1:  # vocabulary-parallel shards
        logits = all_gather_dim(logits.contiguous(), -1, group)
    return logits[0, :, :vocab_size].cpu()


def compare(saved: torch.Tensor, now: torch.Tensor) -> str | None:
    """None when ``now`` matches the ``saved`` logits; otherwise why not (one line)."""
    if tuple(saved.shape) != tuple(now.shape):
        return (f"the saved validation logits have shape {tuple(saved.shape)}, the loaded "
                f"model gives {tuple(now.shape)}")
    if bool(torch.isclose(now, saved.to(now.dtype)).all()):
        return None
    diff = float((now - saved.to(now.dtype)).abs().max())
    return ("a forward pass of the loaded model does not give the logits saved with the "
            f"checkpoint (max |difference| {diff:.3g}): the config builds a different model "
            "than the one saved, or the weights are damaged")
