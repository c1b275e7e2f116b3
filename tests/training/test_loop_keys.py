"""Config keys the training loop reads: save_on_signal, checkpoint_scale, do_train and the
no_save_rng / no_load_optim / no_load_rng switches (what each hands to the checkpoint code)."""

from __future__ import annotations

import types
from typing import Any

import pytest

from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.training import loop

BASE = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
    "train_micro_batch_size_per_gpu": 2, "train_iters": 100,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "data_path": "data/none",
    "tokenizer_type": "CharLevelTokenizer",
}


class FakeStop:
    def __init__(self) -> None:
        self.disabled = False

    def disable(self) -> None:
        self.disabled = True


def trainer(**values: Any) -> tuple[loop.Trainer, FakeStop]:
    cfg = resolve_config(merge_configs([("t.yml", {**BASE, **values})]),
                         RunFacts(world_size=1, purpose=None))
    rt = types.SimpleNamespace(cfg=cfg, tokenizer=None, state=None, tracker=None)
    engine = types.SimpleNamespace(guard=None, ds=None, client_state=dict,
                                   scheduler=types.SimpleNamespace(state_dict=dict),
                                   after_save=lambda: None)
    stop = FakeStop()
    metrics = types.SimpleNamespace(info=lambda line: None)
    budget = types.SimpleNamespace(train_iters=cfg.training.train_iters)
    return loop.Trainer(rt, engine, budget, metrics, stop=stop), stop  # type: ignore[arg-type]


def test_save_on_signal() -> None:
    assert not trainer()[1].disabled
    assert trainer(save_on_signal=False)[1].disabled  # the signals keep their usual meaning


def test_checkpoint_scale_log_and_linear() -> None:
    log, _ = trainer(save_interval=2, checkpoint_scale="log")
    assert [i for i in range(1, 101) if log.should_save(i)] == [1, 2, 4, 8, 16, 32, 64]
    linear, _ = trainer(checkpoint_factor=20, checkpoint_scale="linear", extra_save_iters=[7])
    assert [i for i in range(1, 101) if linear.should_save(i)] == [7, 20, 40, 60, 80, 100]


@pytest.mark.parametrize("flags", [{}, {"no_save_rng": True, "no_save_optim": True}])
def test_save_switches_reach_the_checkpoint(monkeypatch, flags: dict[str, bool]) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(loop, "run_layout", lambda cfg, state: None)
    monkeypatch.setattr(loop, "save_checkpoint", lambda ds, opts, **kw: seen.append(opts))
    t, _ = trainer(save="ckpt", save_interval=10, **flags)
    t.save()
    assert seen[0].save_rng is not flags.get("no_save_rng", False)
    assert seen[0].save_optimizer is not flags.get("no_save_optim", False)


@pytest.mark.parametrize("flags", [{}, {"no_load_optim": True}, {"no_load_rng": True}])
def test_load_switches_reach_the_checkpoint(monkeypatch, flags: dict[str, bool]) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(loop, "run_layout", lambda cfg, state: None)
    monkeypatch.setattr(loop, "load_checkpoint",
                        lambda ds, opts, **kw: seen.append(opts) or None)
    t, _ = trainer(load="ckpt", **flags)
    t.load()
    assert seen[0].load_optimizer is not flags.get("no_load_optim", False)
    assert seen[0].load_rng is not flags.get("no_load_rng", False)


def test_do_train_false_trains_nothing() -> None:
    t, _ = trainer(do_train=False)
    # returns before it touches the data (None would fail in the data loader)
    assert t.train(None, None) == "done"
    assert t.progress.iteration == 0
