"""ParallelState as DeepSpeed's ``mpu``: ZeRO-1 on TP=2 x DP=2 computes the dense grad norm."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.parallel.state import ParallelState
from megatron.parallel.topology import RankTopology
from tests.distributed import run_distributed

init = functools.partial(torch.nn.init.normal_, std=0.3)


def _mlp(state: ParallelState) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ColumnParallelLinear(8, 16, state=state, init_method=init),
        torch.nn.GELU(),
        RowParallelLinear(16, 8, state=state, init_method=init),
    )


def _batch(dp_rank: int) -> torch.Tensor:
    return torch.randn(2, 8, generator=torch.Generator().manual_seed(100 + dp_rank))


def _train_step(rank: int, world: int) -> dict[str, float]:
    import deepspeed

    state = ParallelState.initialize(RankTopology(world, 2, 1))
    model = _mlp(state)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config, mpu=state
    )
    loss = engine(_batch(state.dp_rank)).pow(2).mean()
    engine.backward(loss)
    engine.step()

    # dense reference: one process, the mean loss over both data-parallel batches
    dense = _mlp(ParallelState.single())
    dense_loss = sum(dense(_batch(d)).pow(2).mean() for d in range(state.dp_size)) / state.dp_size
    dense_loss.backward()
    dense_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in dense.parameters()))
    return {
        "norm": float(engine.get_global_grad_norm()),
        "dense_norm": float(dense_norm),
        "dp": engine.dp_world_size,
        "mp": engine.mp_world_size,
    }


@pytest.mark.distributed
def test_zero1_grad_norm_with_tensor_parallel_mpu() -> None:
    results = run_distributed(_train_step, 4, timeout=240)
    for res in results:
        assert (res["dp"], res["mp"]) == (2, 2)
        # replicated parameters counted once, shards from every TP rank
        assert res["norm"] == pytest.approx(res["dense_norm"], rel=1e-5)
