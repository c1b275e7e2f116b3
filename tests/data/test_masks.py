from __future__ import annotations

import torch

from megatron.data.masks import get_document_ids, get_ltor_masks_and_position_ids, prepare_lm_batch

E = 0  # eod


def _reference(tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Per-element loops over a hand-checked definition of the masks."""
    b, s = tokens.shape
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    pos = torch.zeros(b, s, dtype=torch.long)
    loss = torch.ones(b, s)
    for r in range(b):
        doc_of = []
        doc, start = 0, 0
        for j in range(s):
            doc_of.append(doc)
            pos[r, j] = j - start if reset_position_ids else j
            if tokens[r, j] == eod:
                doc += 1
                start = j + 1
                if eod_mask_loss:
                    loss[r, j] = 0
        for q in range(s):
            for k in range(s):
                mask[r, 0, q, k] = k > q or (reset_attention_mask and doc_of[k] != doc_of[q])
    return mask, loss, pos


def test_document_reset_on_a_hand_built_sample():
    tokens = torch.tensor([[5, 6, E, 7, 8, E, 9, 10], [E, 3, 4, 5, 6, 7, E, E]])
    mask, loss, pos = get_ltor_masks_and_position_ids(
        tokens, E, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True
    )
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1], [0, 0, 1, 2, 3, 4, 5, 0]]
    assert loss.tolist() == [[1, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]]
    assert get_document_ids(tokens, E).tolist() == [
        [0, 0, 0, 1, 1, 1, 2, 2],
        [0, 1, 1, 1, 1, 1, 1, 2],
    ]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    # token 3 (first of document 1) sees only itself; token 7 sees tokens 6 and 7
    assert (~mask[0, 0, 3]).nonzero().flatten().tolist() == [3]
    assert (~mask[0, 0, 7]).nonzero().flatten().tolist() == [6, 7]
    assert (~mask[0, 0, 2]).nonzero().flatten().tolist() == [0, 1, 2]  # eod belongs to its document
    ref = _reference(tokens, E, True, True, True)
    assert torch.equal(mask, ref[0]) and torch.equal(loss, ref[1]) and torch.equal(pos, ref[2])


def test_without_reset_the_mask_is_a_shared_causal_mask():
    tokens = torch.randint(0, 5, (3, 16))
    mask, loss, pos = get_ltor_masks_and_position_ids(tokens, E)
    assert mask.shape == (1, 1, 16, 16)
    assert torch.equal(mask[0, 0], torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1))
    assert torch.equal(pos, torch.arange(16).expand(3, 16))
    assert torch.all(loss == 1)
    for flags in [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, True),
    ]:
        got = get_ltor_masks_and_position_ids(
            tokens,
            E,
            reset_position_ids=flags[0],
            reset_attention_mask=flags[1],
            eod_mask_loss=flags[2],
        )
        ref = _reference(tokens, E, *flags)
        assert torch.equal(got[0].expand_as(ref[0]), ref[0])
        assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])


def test_prepare_lm_batch_shifts_and_masks_labels():
    text = torch.tensor([[5, 6, E, 7, 8]])
    label = torch.tensor([[-100, 6, -100, 7, 8]])
    tokens, labels, loss, mask, pos = prepare_lm_batch(
        {"text": text, "label": label}, E, eod_mask_loss=True
    )
    assert tokens.tolist() == [[5, 6, E, 7]]
    assert labels.tolist() == [[6, 0, 7, 8]]
    # label -100 at position 1 and eod input at position 2 are excluded
    assert loss.tolist() == [[1, 0, 0, 1]]
    tokens, labels, loss, mask, pos = prepare_lm_batch({"text": text}, E)
    assert labels.tolist() == [[6, E, 7, 8]] and loss.tolist() == [[1, 1, 1, 1]]
