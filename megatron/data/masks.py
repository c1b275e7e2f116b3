"""Attention masks, loss masks and position ids for left-to-right language modelling.

``get_ltor_masks_and_position_ids(tokens, eod_token, *, reset_position_ids,
reset_attention_mask, eod_mask_loss)`` returns ``(attention_mask, loss_mask, position_ids)``
for input tokens ``[b, s]``:

* ``attention_mask`` -- bool, ``True`` where attention is *masked out* (Megatron convention).
  Without ``reset_attention_mask`` it is the plain causal mask of shape ``[1, 1, s, s]``,
  shared by the whole batch (it broadcasts), so a model may equally ignore it and use its
  causal flag. With ``reset_attention_mask`` it is ``[b, 1, s, s]`` and additionally masks
  every key of an earlier document: documents packed into one sample do not see each other.
  A document ends with (and includes) its eod token.
* ``loss_mask`` -- float ``[b, s]``, 0 at eod input positions when ``eod_mask_loss``.
* ``position_ids`` -- int64 ``[b, s]``; with ``reset_position_ids`` they restart at 0 after
  every eod.

``get_document_ids(tokens, eod_token)`` gives the per-token document number ``[b, s]`` (for
attention kernels that take segment ids instead of a dense mask), and ``prepare_lm_batch``
turns a loader batch (``text`` and optional ``label``, ``[b, s + 1]``) into
``(tokens, labels, loss_mask, attention_mask, position_ids)``; negative labels (-100) are
excluded from the loss.
"""

from __future__ import annotations

from typing import Any

import torch


def causal_mask(seq_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True above the diagonal (future keys masked)."""
    mask = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu_(1)
    return mask.view(1, 1, seq_length, seq_length)


def get_document_ids(tokens: torch.Tensor, eod_token: int) -> torch.Tensor:
    """Number of eod tokens strictly before each position: the document each token is in."""
    is_eod = (tokens == eod_token).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


def get_ltor_masks_and_position_ids(
    tokens: torch.Tensor,
    eod_token: int,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attention_mask, loss_mask, position_ids = _masks_and_position_ids(
        tokens, eod_token, reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss,
        with_attention_mask=True)
    assert attention_mask is not None
    return attention_mask, loss_mask, position_ids


def _masks_and_position_ids(
    tokens: torch.Tensor,
    eod_token: int,
    *,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    with_attention_mask: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    b, s = tokens.shape
    device = tokens.device
    loss_mask = torch.ones(b, s, dtype=torch.float, device=device)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    positions = torch.arange(s, dtype=torch.long, device=device).unsqueeze(0).expand(b, s)
    if reset_position_ids:
        after_eod = torch.zeros(b, s, dtype=torch.bool, device=device)
        after_eod[:, 1:] = tokens[:, :-1] == eod_token
        doc_start = torch.cummax(torch.where(after_eod, positions, 0), dim=1).values
        position_ids = positions - doc_start
    else:
        position_ids = positions.clone()
    if not (with_attention_mask or reset_attention_mask):
        return None, loss_mask, position_ids
    attention_mask = causal_mask(s, device)
    if reset_attention_mask:
        docs = get_document_ids(tokens, eod_token)
        attention_mask = attention_mask | (docs[:, None, :, None] != docs[:, None, None, :])
    return attention_mask, loss_mask, position_ids


def prepare_lm_batch(
    batch: dict[str, Any],
    eod_token: int,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    causal_attention_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(tokens, labels, loss_mask, attention_mask, position_ids)`` from a loader batch.

    ``causal_attention_mask=False`` leaves out the plain causal mask (``attention_mask`` is
    then None unless ``reset_attention_mask`` makes a per-document mask): for models that run
    their causal kernel without one, it saves building an ``s x s`` tensor per micro batch."""
    text = batch["text"].long()
    tokens = text[:, :-1].contiguous()
    if "label" in batch:
        raw = batch["label"].long()[:, 1:]
        valid = raw >= 0
        labels = torch.where(valid, raw, torch.zeros_like(raw)).contiguous()
    else:
        labels = text[:, 1:].contiguous()
        valid = None
    attention_mask, loss_mask, position_ids = _masks_and_position_ids(
        tokens,
        eod_token,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        with_attention_mask=causal_attention_mask,
    )
    if valid is not None:
        loss_mask = loss_mask * valid.float()
    return tokens, labels, loss_mask, attention_mask, position_ids
