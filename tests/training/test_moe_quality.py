"""A mixture-of-experts model with the same active parameters as a dense one reaches a lower
loss in the same number of steps.

Both models: 2 layers, hidden 32, 4 heads, character tokens of the bundled corpus (Python's
help topics), 400 AdamW steps of 16 windows of 32 tokens drawn from a fixed pool of 64 windows
(seeded). Dense: one MLP of width 128. MoE: 8 experts of width 64, top-2 routing, so every
token uses two width-64 experts = the same 2 x 32 x 128 active MLP weights (plus a 32 x 8
router per layer, minus the dense MLP's biases: 192 parameters in all). The MoE has 4x the MLP weights to fit the pool with, which shows within the
steps a test can afford; the loss compared is the final loss over the whole pool.
"""

from __future__ import annotations

import pytest
import torch

from megatron.model import lm_loss
from megatron.model_size import active_parameter_count
from megatron.parallel import ParallelState
from tests.model.gpt_model_helpers import build, make_config

pytestmark = pytest.mark.slow

SEQ, BATCH, POOL, STEPS, SEED = 32, 16, 64, 400, 0
VOCAB = 512


def _pool() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("CharLevelTokenizer")
    ids: list[int] = []
    for name in sorted(topics)[:200]:
        ids += tok.tokenize(topics[name]) + [tok.eod]
    data = torch.tensor(ids)
    starts = torch.randint(0, len(data) - SEQ - 1, (POOL,),
                           generator=torch.Generator().manual_seed(1234))
    windows = torch.stack([data[s:s + SEQ + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def _final_loss(overrides: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    cfg = make_config(hidden_size=32, num_attention_heads=4, seq_length=SEQ, num_layers=2,
                      **overrides)
    model = build(cfg, seed=SEED, padded_vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = ParallelState.single()
    ones = torch.ones_like(y, dtype=torch.float)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(STEPS):
        pick = torch.randint(0, POOL, (BATCH,), generator=g)
        loss = lm_loss(model(x[pick]), y[pick], ones[pick], state)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        final = float(lm_loss(model(x), y, ones, state))
    return final, active_parameter_count(cfg.model, VOCAB)


def test_moe_beats_dense_of_the_same_active_size() -> None:
    torch.set_num_threads(1)
    x, y = _pool()
    dense, dense_active = _final_loss({}, x, y)
    moe, moe_active = _final_loss({"moe_num_experts": 8, "moe_top_k": 2,
                                   "intermediate_size": 64, "moe_router_type": "topk",
                                   "moe_aux_loss_coeff": 0.01}, x, y)
    print(f"\ndense {dense:.4f} ({dense_active:,} active), moe {moe:.4f} ({moe_active:,} active)")
    # only the routers (32 x 8) and the dense MLP's biases (128 + 32) differ, per layer
    assert moe_active - dense_active == 2 * (32 * 8 - (128 + 32))
    assert moe < 0.9 * dense, (moe, dense)
