"""The learning-rate schedule: closed-form values, parameter groups and checkpoint semantics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.training.lr_schedule import AnnealingLR, build_lr_scheduler

BASE: dict[str, Any] = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
    "train_micro_batch_size_per_gpu": 2, "train_iters": 100, "data_path": "x",
    "tokenizer_type": "CharLevelTokenizer", "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
}


def make_cfg(**over: Any):
    return resolve_config(merge_configs([("t.yml", {**BASE, **over})]),
                          RunFacts(world_size=1, launching=False))


def make_optimizer(lr_scales: tuple[float | None, ...] = (None,)) -> torch.optim.Optimizer:
    groups = []
    for scale in lr_scales:
        group: dict[str, Any] = {"params": [torch.nn.Parameter(torch.zeros(2))]}
        if scale is not None:
            group["lr_scale"] = scale
        groups.append(group)
    return torch.optim.SGD(groups, lr=123.0)


def schedule(style: str, **kw: Any) -> AnnealingLR:
    args: dict[str, Any] = {"start_lr": 1.0, "warmup_iters": 10, "total_iters": 110,
                            "decay_style": style, "min_lr": 0.1}
    args.update(kw)
    return AnnealingLR(make_optimizer(), **args)


def lr_at(sched: AnnealingLR, n: int) -> float:
    sched.step(n - sched.num_iters)
    return sched.get_lr()


# Hand-computed values with lr 1, min_lr 0.1, warmup 10, total 110 (decay over 100 steps).
EXPECTED = {
    #               n=0  n=5  n=10  n=35 (p=.25)                        n=110 n=500
    "constant":    (0.0, 0.5, 1.0, 1.0, 1.0, 1.0),
    "linear":      (0.0, 0.5, 1.0, 0.1 + 0.9 * 0.75, 0.1, 0.1),
    "cosine":      (0.0, 0.5, 1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.1, 0.1),
    "exponential": (0.0, 0.5, 1.0, 0.1 ** 0.25, 0.1, 0.1),
}


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_values_at_warmup_mid_and_end(style: str) -> None:
    sched = schedule(style)
    got = [lr_at(sched, n) for n in (0, 5, 10, 35, 110, 500)]
    assert got == pytest.approx(EXPECTED[style], rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential"])
def test_matches_closed_form_everywhere(style: str) -> None:
    lr, min_lr, warm, total = 3e-4, 2e-5, 7, 57
    sched = schedule(style, start_lr=lr, min_lr=min_lr, warmup_iters=warm, total_iters=total)
    for n in range(0, 80):
        if n <= warm:
            want = lr * n / warm
        else:
            p = min(1.0, (n - warm) / (total - warm))
            want = {
                "linear": min_lr + (lr - min_lr) * (1 - p),
                "cosine": min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * p)),
                "exponential": max(min_lr, lr * 0.1 ** p),
            }[style]
        assert lr_at(sched, n) == pytest.approx(want, rel=1e-12), n
    # monotone non-increasing after warmup
    values = [lr_at(schedule(style, start_lr=lr, min_lr=min_lr, warmup_iters=warm,
                             total_iters=total), n) for n in range(warm, total + 5)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_exponential_is_floored_at_min_lr() -> None:
    sched = schedule("exponential", min_lr=0.3)
    assert lr_at(sched, 30) == pytest.approx(0.1 ** 0.2)  # above the floor
    assert lr_at(sched, 85) == pytest.approx(0.3)  # 0.1 ** 0.75 = 0.178 < 0.3


def test_no_warmup_starts_at_peak() -> None:
    assert schedule("cosine", warmup_iters=0).get_lr() == pytest.approx(1.0)


def test_groups_get_lr_times_scale() -> None:
    opt = make_optimizer((None, 0.5, 2.0))
    sched = AnnealingLR(opt, start_lr=1.0, warmup_iters=4, total_iters=10,
                        decay_style="linear", min_lr=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]  # set at construction
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.125, 0.5])
    sched.step(3)
    assert sched.num_iters == 4
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.5, 2.0])


def test_build_from_config() -> None:
    cfg = make_cfg(warmup=0.1, lr_decay_style="cosine", min_lr=1e-5)
    opt = make_optimizer()
    sched = build_lr_scheduler(opt, cfg.lr, cfg.optim, cfg.training.train_iters)
    assert (sched.warmup_iters, sched.total_iters, sched.start_lr, sched.min_lr) == \
        (10, 100, 1e-3, 1e-5)
    assert sched.decay_style == "cosine"
    cfg = make_cfg(lr_decay_iters=50, warmup=0.25, lr=2e-3)
    sched = build_lr_scheduler(make_optimizer(), cfg.lr, cfg.optim, cfg.training.train_iters)
    assert (sched.warmup_iters, sched.total_iters, sched.start_lr) == (12, 50, 2e-3)
    sched.step(12)
    assert sched.get_lr() == pytest.approx(2e-3)


def test_state_dict_round_trip() -> None:
    a = schedule("cosine")
    a.step(37)
    state = a.state_dict()
    assert state == {"start_lr": 1.0, "warmup_iter": 10, "end_iter": 110,
                     "decay_style": "cosine", "min_lr": 0.1, "num_iters": 37}
    opt = make_optimizer()
    b = AnnealingLR(opt, start_lr=1.0, warmup_iters=10, total_iters=110, decay_style="cosine",
                    min_lr=0.1)
    b.load_state_dict(state)
    assert b.num_iters == 37 and b.get_lr() == a.get_lr()
    assert opt.param_groups[0]["lr"] == pytest.approx(a.get_lr())


def test_mismatch_raises_naming_the_field() -> None:
    saved = schedule("linear")
    saved.step(20)
    other = schedule("linear", warmup_iters=5)
    with pytest.raises(ValueError, match="warmup_iters=10.*override_lr_scheduler") as info:
        other.load_state_dict(saved.state_dict())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="decay_style"):
        schedule("cosine").load_state_dict(saved.state_dict())


def test_override_keeps_config_values_but_iteration_from_checkpoint() -> None:
    saved = schedule("linear", start_lr=2.0)
    saved.step(60)
    mine = schedule("cosine", start_lr=1.0, override_lr_scheduler=True)
    mine.load_state_dict(saved.state_dict())
    assert (mine.decay_style, mine.start_lr, mine.num_iters) == ("cosine", 1.0, 60)
    assert mine.get_lr() == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_use_checkpoint_takes_checkpoint_values() -> None:
    saved = schedule("linear", start_lr=2.0, warmup_iters=20, total_iters=220, min_lr=0.0)
    saved.step(120)
    mine = schedule("cosine", use_checkpoint_lr_scheduler=True)
    mine.load_state_dict(saved.state_dict())
    assert (mine.decay_style, mine.start_lr, mine.warmup_iters, mine.total_iters, mine.min_lr,
            mine.num_iters) == ("linear", 2.0, 20, 220, 0.0, 120)
    assert mine.get_lr() == pytest.approx(saved.get_lr()) == pytest.approx(1.0)


def test_both_flags_rejected() -> None:
    with pytest.raises(ValueError, match="choose one"):
        schedule("linear", override_lr_scheduler=True, use_checkpoint_lr_scheduler=True)
    with pytest.raises(ValueError, match="lr_decay_style"):
        schedule("step")
