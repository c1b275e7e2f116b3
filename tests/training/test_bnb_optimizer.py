"""``use_bnb_optimizer``: optimizer.type Adam/AdamW runs as bitsandbytes' 8-bit Adam on these
CPU ranks (bitsandbytes 0.50 has a CPU backend): its moments are stored in 8 bits, and a
tiny GPT trains along the same loss curve as with the 32-bit AdamW."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTModel
from megatron.parallel import ParallelState
from megatron.training.optimizers import build_optimizer, check_zero_compat
from tests.conversion.conversion_helpers import config_from_values

OPTIMIZER = {"type": "Adam", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}}


def _train(use_bnb: bool, steps: int = 25) -> tuple[list[float], torch.optim.Optimizer, dict]:
    cfg = config_from_values(hidden_size=64, seq_length=32, optimizer=OPTIMIZER,
                             weight_decay=0.1, use_bnb_optimizer=use_bnb)
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    optimizer, zero_tested = build_optimizer(cfg.optim, model)
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, 64, (4, 8), generator=gen)
    tokens = pattern.repeat(1, 5)[:, :33]  # a repeating sequence: learnable in a few steps
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer, {"zero_tested": zero_tested, "optim": cfg.optim}


def test_use_bnb_optimizer_trains_with_8bit_adam_like_adamw():
    torch.set_num_threads(1)
    ref, adamw, _ = _train(use_bnb=False)
    losses, optimizer, info = _train(use_bnb=True)
    assert isinstance(adamw, torch.optim.AdamW)
    assert isinstance(optimizer, bnb.optim.Adam8bit)
    dtypes = {p.numel() >= 4096: optimizer.state[p]["state1"].dtype
              for g in optimizer.param_groups for p in g["params"]}
    assert dtypes == {True: torch.uint8, False: torch.float32}  # 8 bits above 4096 elements
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert losses[-1] < losses[0] - 1.0, losses
    # the quantized moments follow the 32-bit curve closely
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.02, (losses, ref)
    # ZeRO has not tested it: refused in one line unless zero_allow_untested_optimizer
    assert info["zero_tested"] is False
    with pytest.raises(ValueError, match="untested with ZeRO stage 1"):
        check_zero_compat(info["optim"], 1, optimizer)
