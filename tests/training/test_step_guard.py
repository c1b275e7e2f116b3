"""The step guard on 2 gloo ranks: a non-finite loss on one rank skips the step everywhere."""

from __future__ import annotations

import pytest
import torch

from megatron.training.control import NonFiniteError, StepGuard
from tests.distributed import run_distributed


def _guarded_training(rank: int, world: int, stage: int, bf16: bool) -> dict:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
              "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    guard = StepGuard(max_consecutive=3)
    guard.install(optimizer, engine.optimizer)
    snapshots, skipped = [], []
    for step in range(4):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(10 * step + rank))
        if bf16:
            x = x.bfloat16()
        loss = engine(x).float().pow(2).mean()
        if step == 2 and rank == 1:  # only one rank sees a non-finite loss
            loss = loss * float("nan")
        guard.note_loss(loss)
        engine.backward(loss)
        guard.decide(engine.module.parameters())
        engine.step()
        skipped.append(guard.end_step())
        snapshots.append([p.detach().float().clone() for p in engine.module.parameters()])
    return {"skipped": skipped, "total": guard.skipped_total, "snapshots": snapshots}


@pytest.mark.distributed
@pytest.mark.parametrize("stage,bf16", [(0, False), (1, False), (2, False), (1, True)])
def test_one_rank_nan_skips_the_step_on_all_ranks(stage, bf16):
    results = run_distributed(_guarded_training, 2, stage, bf16, timeout=300)
    for res in results:
        assert res["skipped"] == [False, False, True, False]
        assert res["total"] == 1
        before, skipped, after = res["snapshots"][1], res["snapshots"][2], res["snapshots"][3]
        assert all(torch.equal(a, b) for a, b in zip(before, skipped))  # nothing moved
        assert any(not torch.equal(a, b) for a, b in zip(skipped, after))  # training goes on
        assert all(torch.isfinite(p).all() for p in after)
    # both replicas hold the same weights afterwards
    for a, b in zip(results[0]["snapshots"][3], results[1]["snapshots"][3]):
        assert torch.equal(a, b)


def test_too_many_skips_in_a_row_raise():
    guard = StepGuard(max_consecutive=2)

    def step(loss: float) -> bool:
        guard.note_loss(torch.tensor(loss))
        guard.decide([])
        guard.stepped = True  # as the wrapped optimizer step would
        return guard.end_step()

    assert step(float("inf")) is True
    assert step(1.0) is False  # an applied step resets the run of skips
    assert step(float("nan")) is True
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row were skipped"):
        step(float("nan"))
    assert guard.skipped_total == 3
