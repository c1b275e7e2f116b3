"""Expert parallelism against the same run without it, from the same seed, on gloo ranks:
per-step losses of EP=2 equal EP=1 (fp32, 1e-5 relative) for the plain model under ZeRO 0,
1 and 2, with tensor parallelism (TP=2) and with the pipeline (PP=2); the weights end equal.
Checkpoints written through the trainer's save code at EP=1 and at EP=2 resume exactly through
its load code at the other expert-parallel size (and at their own). The pipeline model (PP=2)
with MoE layers gives the per-step losses of the plain model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from megatron.checkpoint.relayout import Layout, RunLayout, model_shape
from megatron.checkpoint.reshard import merge_tp_shards
from megatron.checkpoint.resume import LoadOptions, SaveOptions, load_checkpoint, save_checkpoint
from megatron.checkpoint.weights import read_model_state_dict
from megatron.model import build_model, lm_loss
from megatron.model.moe import set_aux_loss_scale
from megatron.parallel import ParallelState, RankTopology
from megatron.parallel.experts import is_expert_parameter, split_expert_param_groups
from megatron.parallel.layers import is_tensor_parallel
from megatron.training.grad_norm import global_grad_norm
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import batch, make_config

STEPS = 3
MICRO = 2  # micro batches per rank and step
MOE = {"moe_num_experts": 4, "moe_top_k": 2, "moe_router_type": "topk",
       "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001, "num_layers": 2,
       "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
       "make_vocab_size_divisible_by": 16}  # the same padded vocabulary at TP 1 and 2


def _ds_config(dp: int, zero: int) -> dict:
    return {
        "train_batch_size": dp * MICRO,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": MICRO,
        "steps_per_print": 10_000,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def _micro(step: int, dp_rank: int, micro: int) -> tuple[tuple, tuple]:
    tokens, labels, loss_mask = batch(1, 16, seed=1000 + 13 * dp_rank + micro)  # same batch each step
    mask = torch.ones(16, 16, dtype=torch.bool).triu(1).view(1, 1, 16, 16)
    positions = torch.arange(16).view(1, 16)
    return (tokens, positions, mask), (labels, loss_mask)


def _train(world: int, tp: int, pp: int, ep: int, zero: int, save: str | None = None,
           load: str | None = None, split_experts: bool = False) -> dict[str, Any]:
    """``STEPS`` steps of one layout; ``save`` writes a checkpoint after the first step,
    ``load`` starts from that checkpoint (and runs the remaining steps); ``split_experts``
    splits the experts over tensor parallelism (``enable_expert_tensor_parallelism``)."""
    import deepspeed

    cfg = make_config(world_size=world, model_parallel_size=tp, pipe_parallel_size=pp,
                      expert_model_parallel_size=ep,
                      enable_expert_tensor_parallelism=split_experts, **MOE)
    state = ParallelState.initialize(RankTopology(world, tp, max(pp, 1)), expert_parallel=ep)
    model = build_model(cfg.model, cfg.act_ckpt, cfg.parallelism,
                        padded_vocab_size=cfg.tokenizer.padded_vocab_size, state=state,
                        tracker=None, init_seed=7)
    set_aux_loss_scale(model, 1.0 / MICRO)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(split_expert_param_groups([{"params": model.parameters()}]),
                                  lr=0.5, momentum=0.5),
        config=_ds_config(state.dp_size, zero), mpu=None if pp else state,
    )  # fmt: skip
    run = RunLayout(Layout(tp, pp, state.dp_size, zero, ep), cfg.model,
                    model_shape(cfg.model, cfg.tokenizer.padded_vocab_size), rank=state.rank,
                    tp_rank=state.tp_rank, pp_rank=state.pp_rank, dp_rank=state.dp_rank,
                    ep_rank=state.ep_rank)
    first = 0
    if load is not None:  # the trainer's load path (a changed layout reshards)
        loaded = load_checkpoint(engine, LoadOptions(load, layout=run), tracker=None,
                                 log=lambda line: None)
        assert loaded is not None and loaded.iteration == 1
        first = 1
    losses: list[float] = []
    norms: list[float | None] = []  # the trainer's global gradient norm (ZeRO 0)
    for step in range(first, STEPS):
        if save is not None and step == 1:
            save_checkpoint(engine, SaveOptions(save, layout=run), iteration=1,
                            client_state={"iteration": 1}, tracker=None, config_files={})
        if pp:
            data = iter([_micro(step, state.dp_rank, m) for m in range(MICRO)])
            loss = engine.train_batch(data_iter=data).detach().float().reshape(())
            torch.distributed.all_reduce(loss, group=state.dp_group)  # mean over replicas
            losses.append(float(loss) / state.dp_size)
            continue
        total = torch.zeros(())
        for m in range(MICRO):
            (tokens, positions, mask), (labels, loss_mask) = _micro(step, state.dp_rank, m)
            loss = lm_loss(engine(tokens, positions, mask), labels, loss_mask, state)
            engine.backward(loss)
            if zero == 0 and m == MICRO - 1:  # the reduced gradients, before the update
                norms.append(global_grad_norm(model.parameters(), state))
            engine.step()
            total += loss.detach() / MICRO
        torch.distributed.all_reduce(total, group=state.dp_group)
        losses.append(float(total) / state.dp_size)
    experts = {n: _all_experts(n, p, state, cfg.model) for n, p in model.named_parameters()
               if n.endswith(("w_in", "w_out", "router.weight"))}
    expert_numel = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    return {"losses": losses, "experts": experts, "expert_numel": expert_numel,
            "norms": norms}


def _all_experts(name: str, param: torch.Tensor, state: ParallelState,
                 model: Any) -> torch.Tensor:
    """An expert shard gathered over its tensor-parallel group when split over it, and over
    its expert-parallel group (every expert, in order)."""
    tensor = param.detach().clone()
    if is_tensor_parallel(param):
        parts = [torch.empty_like(tensor) for _ in range(state.tp_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=state.tp_group)
        tensor = merge_tp_shards([{name: part} for part in parts], model)[name]
    if not is_expert_parameter(param) or state.ep_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(state.ep_size)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=state.ep_group)
    return torch.cat(parts)


def _compare_runs(rank: int, world: int, runs: list[tuple]) -> list:
    """``runs``: ``(tp, pp, ep, zero)`` layouts, optionally followed by a checkpoint directory
    to save to and one to resume from."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return [_train(world, *run) for run in runs]


def _check_equal(out: list, reference: int, others: list[int]) -> None:
    for rank_out in out:
        ref = rank_out[reference]
        assert ref["losses"][-1] < ref["losses"][0], ref["losses"]  # it trained
        for i in others:
            assert_close(torch.tensor(rank_out[i]["losses"]), torch.tensor(ref["losses"]),
                         rtol=1e-5, atol=0)
            for name, value in ref["experts"].items():
                assert_close(rank_out[i]["experts"][name], value, rtol=1e-4, atol=1e-6,
                             msg=name)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> list:
    """On 2 ranks, (tp, pp, ep, zero, save, load): EP=1 ZeRO 0 is the reference and writes a
    checkpoint after its first step, EP=2 ZeRO 1 writes another; each is resumed at the other
    expert-parallel size (and the EP=2 one at its own layout)."""
    ep1, ep2 = (str(tmp_path_factory.mktemp(name)) for name in ("ep1", "ep2"))
    runs = [(1, 0, 1, 0, ep1), (1, 0, 2, 0), (1, 0, 2, 1, ep2), (1, 0, 2, 2),
            (1, 0, 2, 1, None, ep1), (1, 0, 1, 1, None, ep2), (1, 0, 2, 1, None, ep2)]
    out = run_distributed(_compare_runs, 2, runs, timeout=400)
    out[0].extend([ep1, ep2])  # where the checkpoints are: the last entries of rank 0's list
    return out


@pytest.mark.distributed
def test_expert_parallel_matches_without_under_zero_0_1_2(two_rank_runs: list) -> None:
    out = two_rank_runs
    _check_equal([o[:4] for o in out], 0, [1, 2, 3])
    for rank_out in out:  # each EP=2 rank stores half of the experts
        assert rank_out[1]["expert_numel"] * 2 == rank_out[0]["expert_numel"] > 0
        # the global gradient norm (logged, clipped by) counts every expert once
        assert_close(torch.tensor(rank_out[1]["norms"]), torch.tensor(rank_out[0]["norms"]),
                     rtol=1e-5, atol=0)
    for rank_out in out:  # a checkpoint written at EP=1 resumes exactly at EP=2
        saved, resumed = rank_out[0], rank_out[4]
        assert_close(torch.tensor(resumed["losses"]), torch.tensor(saved["losses"][1:]),
                     rtol=1e-5, atol=0)
        for name, value in saved["experts"].items():
            assert_close(resumed["experts"][name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.distributed
def test_expert_parallel_checkpoint_resumes_at_other_expert_parallel_sizes(
        two_rank_runs: list) -> None:
    for rank_out in two_rank_runs:  # written at EP=2: resumed at EP=1 and at EP=2
        saved = rank_out[2]
        for resumed in rank_out[5:7]:
            assert_close(torch.tensor(resumed["losses"]), torch.tensor(saved["losses"][1:]),
                         rtol=1e-5, atol=0)
            for name, value in saved["experts"].items():
                assert_close(resumed["experts"][name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.distributed
def test_expert_parallel_with_tensor_and_pipeline_parallel(two_rank_runs: list) -> None:
    # 4 ranks: TP=2 x DP=2 and PP=2 x DP=2, each with EP=2 against EP=1; at TP=2 the EP=1
    # reference keeps every expert whole on each tensor-parallel rank (the default), the EP=2
    # run splits them over tensor parallelism (enable_expert_tensor_parallelism). Then DP=4
    # with EP=2 under ZeRO 0 and 1: two replicas of every expert shard, whose gradients are
    # reduced over the expert-data-parallel group (and partitioned over it by ZeRO 1)
    layouts = [(2, 0, 1, 0), (2, 0, 2, 0, None, None, True), (1, 2, 1, 0), (1, 2, 2, 0),
               (1, 0, 1, 0), (1, 0, 2, 0), (1, 0, 2, 1)]
    out = run_distributed(_compare_runs, 4, layouts, timeout=400)
    _check_equal([o[:2] for o in out], 0, [1])
    _check_equal([o[4:] for o in out], 0, [1, 2])
    pipeline = [o[2:4] for o in out]
    for rank_out in pipeline:
        assert rank_out[0]["losses"][-1] < rank_out[0]["losses"][0]
        assert_close(torch.tensor(rank_out[1]["losses"]), torch.tensor(rank_out[0]["losses"]),
                     rtol=1e-5, atol=0)
    # the pipeline (PP=2 x DP=2) against the plain model (DP=2, 2 ranks): the same data
    # parallel replicas see the same batches, so the per-step losses agree
    plain = two_rank_runs[0][0]["losses"]
    for rank_out in pipeline:
        for run in rank_out:
            assert_close(torch.tensor(run["losses"]), torch.tensor(plain), rtol=1e-5, atol=0)


@pytest.mark.distributed
def test_expert_parallel_checkpoint_reads_as_full_weights(two_rank_runs: list) -> None:
    """The weights reader (generate, eval, conversion) sees every expert of an EP=2
    checkpoint: the same model as the EP=1 checkpoint of the same step."""
    ep1, ep2 = two_rank_runs[0][-2:]
    model = make_config(world_size=2, **MOE).model
    want, _ = read_model_state_dict(ep1, model)
    got, _ = read_model_state_dict(ep2, model)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        assert_close(got[name].float(), value.float(), rtol=1e-5, atol=1e-6, msg=name)
