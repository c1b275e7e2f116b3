"""Parameter groups, the optimizer builder, Lion and SM3 against hand-computed updates."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.training.optimizers import (
    SM3,
    Lion,
    build_optimizer,
    check_optimizer_supported,
    check_zero_compat,
    param_groups,
    uses_deepspeed_optimizer,
)

BASE: dict[str, Any] = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
    "train_micro_batch_size_per_gpu": 2, "train_iters": 100, "data_path": "x",
    "tokenizer_type": "CharLevelTokenizer",
}


def optim_args(kind: str, **params: Any):
    values = {**BASE, "optimizer": {"type": kind, "params": {"lr": 1e-3, **params}}}
    return resolve_config(merge_configs([("t.yml", values)]),
                          RunFacts(world_size=1, launching=False)).optim


def optim_args_with(kind: str, params: dict[str, Any], **top: Any):
    values = {**BASE, **top, "optimizer": {"type": kind, "params": params}}
    return resolve_config(merge_configs([("t.yml", values)]),
                          RunFacts(world_size=1, launching=False)).optim


class ToyRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class OddNorm(nn.Module):  # a norm whose parameter happens to be 2-D
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, 3))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = ToyRMSNorm(8)
        self.odd = OddNorm()
        self.marked = nn.Parameter(torch.randn(3, 8))
        self.marked._no_weight_decay = True  # type: ignore[attr-defined]
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(tokens))
        h = self.ln(h) * self.rms.weight + (self.marked.sum() + self.odd.scale.sum()) * 0.01
        return self.head(h)


def test_param_groups_exclude_biases_norms_and_marked() -> None:
    model = Toy()
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = (g["params"] for g in groups)
    assert [id(p) for p in decay] == [id(model.embed.weight), id(model.proj.weight)]
    assert [id(p) for p in no_decay] == [
        id(model.marked), id(model.proj.bias), id(model.ln.weight), id(model.ln.bias),
        id(model.rms.weight), id(model.odd.scale),
    ]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(decay) + len(no_decay) == len(trainable) == 8
    # Same order on a second, identically built model.
    again = param_groups(Toy(), 0.1)
    assert [[tuple(p.shape) for p in g["params"]] for g in again] == \
        [[tuple(p.shape) for p in g["params"]] for g in groups]


def test_param_groups_drop_empty_group() -> None:
    groups = param_groups(nn.LayerNorm(4), 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 2


def _loss(model: Toy) -> torch.Tensor:
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    return model(tokens).pow(2).mean()


@pytest.mark.parametrize("kind, params, cls", [
    ("Adam", {"betas": [0.9, 0.95], "eps": 1e-8}, torch.optim.AdamW),
    ("AdamW", {"betas": [0.9, 0.95]}, torch.optim.AdamW),
    ("SGD", {"momentum": 0.9}, torch.optim.SGD),
    ("Lion", {"betas": [0.9, 0.99]}, Lion),
    ("SM3", {"momentum": 0.5}, SM3),
    ("CPU_torch_adam", {"betas": [0.9, 0.999]}, torch.optim.AdamW),
])
def test_every_optimizer_steps(kind: str, params: dict[str, Any], cls: type) -> None:
    torch.manual_seed(0)
    model = Toy()
    built = build_optimizer(optim_args(kind, **params), model)
    opt = built.optimizer
    assert type(opt) is cls
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _loss(model).backward()
    opt.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert all(changed), f"{kind}: some parameters did not move: {changed}"
    assert built.zero_tested == (cls is torch.optim.AdamW)


def test_adam_is_decoupled_adamw_with_foreach_on_cpu() -> None:
    opt = build_optimizer(optim_args("Adam", betas=[0.9, 0.95]), Toy()).optimizer
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["foreach"] is True and not group["fused"]
    assert group["betas"] == (0.9, 0.95)


def test_resolved_lr_and_params_weight_decay_win() -> None:
    args = optim_args_with("Lion", {"lr": 1e-3, "weight_decay": 0.3}, lr=5e-4, weight_decay=0.1)
    opt = build_optimizer(args, Toy()).optimizer
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_sgd_momentum_passes_through() -> None:
    opt = build_optimizer(optim_args("SGD", momentum=0.7, nesterov=True), Toy()).optimizer
    assert opt.param_groups[0]["momentum"] == 0.7 and opt.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("kind, bad", [("Lion", "eps"), ("Adam", "momentum"), ("SGD", "betas"),
                                       ("SM3", "betas")])
def test_unknown_params_rejected(kind: str, bad: str) -> None:
    # config validation refuses these already (tests/config/test_hostile_input.py); the
    # builder's own check is exercised on an optimizer section that bypassed it
    args = dataclasses.replace(
        optim_args(kind), optimizer={"type": kind, "params": {"lr": 1e-3, bad: 0.5}})
    with pytest.raises(ValueError, match=rf"^optimizer\.params\.{bad}: ") as info:
        build_optimizer(args, Toy())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=rf"optimizer\.params\.{bad}"):
        check_optimizer_supported(args)


def test_groups_given_directly() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    b = nn.Parameter(torch.zeros(2))
    groups = [{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0,
                                                     "lr_scale": 0.1}]
    opt = build_optimizer(optim_args("SGD"), groups).optimizer
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[1]["lr_scale"] == 0.1


def test_one_bit_adam_clear_error_on_cpu() -> None:
    args = optim_args("OneBitAdam", freeze_step=10)
    assert uses_deepspeed_optimizer(args)
    for call in (lambda: build_optimizer(args, Toy()), lambda: check_optimizer_supported(args)):
        with pytest.raises(ValueError, match=r"optimizer\.type OneBitAdam.*(GPU|NCCL)") as info:
            call()
        assert "\n" not in str(info.value)
    assert not uses_deepspeed_optimizer(optim_args("Adam"))


def test_madgrad_not_supported() -> None:
    with pytest.raises(ValueError, match="madgrad_wd is not supported"):
        build_optimizer(optim_args("madgrad_wd"), Toy())


def test_cpu_torch_adam_needs_cpu_parameters() -> None:
    meta = nn.Parameter(torch.empty(2, 2, device="meta"))
    with pytest.raises(ValueError, match="must live on the CPU"):
        build_optimizer(optim_args("CPU_torch_adam"), [meta])


def test_zero_compat_check() -> None:
    lion_args = optim_args("Lion")
    lion = build_optimizer(lion_args, Toy()).optimizer
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer") as info:
        check_zero_compat(lion_args, 1, lion)
    assert "\n" not in str(info.value) and "Lion" in str(info.value)
    check_zero_compat(lion_args, 0, lion)  # ZeRO off: anything goes
    allowed = optim_args_with("Lion", {"lr": 1e-3}, zero_allow_untested_optimizer=True)
    check_zero_compat(allowed, 2, lion)
    adam_args = optim_args("AdamW")
    check_zero_compat(adam_args, 3, build_optimizer(adam_args, Toy()).optimizer)
    with pytest.raises(ValueError, match="zero_allow_untested_optimizer"):
        check_zero_compat(optim_args("OneBitAdam"), 1, None)


# ------------------------------------------------------------------------- hand-computed updates


def test_lion_two_steps_by_hand() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    # step 1: m=0, c = 0.1 g -> sign [1, -1, 0]; p = p * (1 - 0.1 * 0.5) - 0.1 * sign(c)
    p.grad = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.85, -1.8, 0.475], dtype=torch.float64))
    m1 = torch.tensor([0.003, -0.001, 0.0], dtype=torch.float64)  # 0.01 g
    assert torch.allclose(opt.state[p]["exp_avg"], m1)
    # step 2: c = 0.9 m1 + 0.1 g = [0.0017, -0.0509, 0.02]: the first sign comes from the
    # momentum, not from the (negative) gradient.
    p.grad = torch.tensor([-0.01, -0.5, 0.2], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([0.85 * 0.95 - 0.1, -1.8 * 0.95 + 0.1, 0.475 * 0.95 - 0.1],
                            dtype=torch.float64)
    assert torch.allclose(p.detach(), expected)
    m2 = torch.tensor([0.00287, -0.00599, 0.002], dtype=torch.float64)  # 0.99 m1 + 0.01 g
    assert torch.allclose(opt.state[p]["exp_avg"], m2)


def test_sm3_matrix_two_steps_by_hand() -> None:
    p0 = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    p = nn.Parameter(p0.clone())
    opt = SM3([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([[1.0, 2.0, -0.5], [0.5, -1.0, 3.0]], dtype=torch.float64)
    opt.step()
    # accumulators start at 0, so nu = g^2 and the update is sign(g)
    p1 = p0 - 0.1 * torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(p.detach(), p1)
    rows, cols = opt.state[p]["accumulators"]
    assert rows.shape == (2, 1) and cols.shape == (1, 3)
    # row maxima of nu = [[1, 4, 0.25], [0.25, 1, 9]] and column maxima
    assert torch.equal(rows.flatten(), torch.tensor([4.0, 9.0], dtype=torch.float64))
    assert torch.equal(cols.flatten(), torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    p.grad = torch.ones(2, 3, dtype=torch.float64)
    opt.step()
    # nu = min(row_i, col_j) + 1 = [[1, 4, 4], [1, 4, 9]] + 1
    nu = torch.tensor([[2.0, 5.0, 5.0], [2.0, 5.0, 10.0]], dtype=torch.float64)
    assert torch.allclose(p.detach(), p1 - 0.1 / nu.sqrt())
    assert torch.equal(rows.flatten(), torch.tensor([5.0, 10.0], dtype=torch.float64))
    assert torch.equal(cols.flatten(), torch.tensor([2.0, 5.0, 10.0], dtype=torch.float64))


def test_sm3_zero_gradient_is_no_update_with_default_eps() -> None:
    p = nn.Parameter(torch.tensor([[1.0, 2.0]]))
    opt = SM3([p], lr=0.1)
    p.grad = torch.tensor([[0.0, 4.0]])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([[1.0, 1.9]]))


def test_sm3_vector_and_momentum_by_hand() -> None:
    p = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = SM3([p], lr=0.1, momentum=0.5, eps=0.0)
    p.grad = torch.tensor([3.0, -4.0], dtype=torch.float64)
    opt.step()
    # update1 = [1, -1]; m1 = 0.5 * update1; p1 = p0 - 0.1 m1
    assert torch.allclose(p.detach(), torch.tensor([0.95, 1.05], dtype=torch.float64))
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    # full accumulator: nu = [9 + 1, 16 + 1]; m2 = 0.5 m1 + 0.5 / sqrt(nu)
    m2 = 0.25 * torch.tensor([1.0, -1.0], dtype=torch.float64) + 0.5 / torch.tensor(
        [10.0, 17.0], dtype=torch.float64).sqrt()
    assert torch.allclose(opt.state[p]["momentum_buffer"], m2)
    assert torch.allclose(p.detach(), torch.tensor([0.95, 1.05], dtype=torch.float64) - 0.1 * m2)
    (acc,) = opt.state[p]["accumulators"]
    assert torch.equal(acc, torch.tensor([10.0, 17.0], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(64, 32), (10,), (4, 5, 6)])
def test_sm3_state_memory_is_sum_of_dims(shape: tuple[int, ...]) -> None:
    p = nn.Parameter(torch.randn(*shape))
    opt = SM3([p], lr=0.01)
    p.grad = torch.randn(*shape)
    opt.step()
    numel = sum(t.numel() for t in opt.state[p]["accumulators"])
    assert numel == sum(shape)
    assert "momentum_buffer" not in opt.state[p]
    assert math.prod(shape) > numel or len(shape) == 1


@pytest.mark.slow
def test_cpu_adam_deepspeed_kernel_steps() -> None:
    torch.manual_seed(0)
    model = Toy()
    built = build_optimizer(optim_args("CPU_Adam", betas=[0.9, 0.95]), model)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    assert type(built.optimizer) is DeepSpeedCPUAdam and built.zero_tested
    assert built.optimizer.adam_w_mode
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _loss(model).backward()
    built.optimizer.step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
