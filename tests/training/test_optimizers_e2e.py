"""Every optimizer and LR schedule takes real steps in the trainer (deepy.py, one CPU rank)."""

from __future__ import annotations

import pytest
import torch
from e2e_helpers import base_values, build_char_corpus, explain, records, run_deepy, write_config

from megatron.training.lr_schedule import scheduled_lr

pytestmark = pytest.mark.slow

CASES = [
    ("Adam", "cosine", {"lr": 0.002, "betas": [0.9, 0.95]}),
    ("SGD", "exponential", {"lr": 0.05, "momentum": 0.9}),
    ("Lion", "constant", {"lr": 0.0005}),
    ("SM3", "linear", {"lr": 0.05}),
    ("CPU_torch_adam", "cosine", {"lr": 0.002}),
    ("CPU_Adam", "linear", {"lr": 0.002}),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"), max_docs=100)


def weights(step_dir):
    state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return state["module"]


@pytest.mark.parametrize("optimizer,schedule,params", CASES, ids=[c[0] for c in CASES])
def test_optimizer_and_schedule_take_steps(corpus, tmp_path, optimizer, schedule, params):
    run = tmp_path / "run"
    iters, warmup = 4, 0.25
    cfg = write_config(tmp_path / "run.yml", base_values(
        corpus, run, train_iters=iters, lr_decay_style=schedule, warmup=warmup,
        min_lr=params["lr"] / 10, optimizer={"type": optimizer, "params": params},
        zero_allow_untested_optimizer=True, save=str(run / "ckpt"), extra_save_iters=[0],
        save_interval=iters,
    ))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 0, explain(proc)
    train = records(run)
    assert [r["skipped_iters"] for r in train] == [0] * iters
    # the logged learning rate follows the schedule's closed form
    for r in train:
        want = scheduled_lr(r["iteration"], start_lr=params["lr"], warmup_iters=int(warmup * iters),
                            total_iters=iters, decay_style=schedule, min_lr=params["lr"] / 10)
        assert r["lr"] == pytest.approx(want, rel=1e-6), r
    # every weight matrix moved away from the initial weights
    before = weights(run / "ckpt" / "global_step0")
    after = weights(run / "ckpt" / f"global_step{iters}")
    moved = [k for k in before if before[k].dim() == 2 and not torch.equal(before[k], after[k])]
    matrices = [k for k in before if before[k].dim() == 2]
    assert moved == matrices
