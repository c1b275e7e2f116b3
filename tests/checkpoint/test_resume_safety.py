"""Loading never starts over on top of existing checkpoints, never follows ``latest`` outside
the save directory, and points at the previous complete checkpoint when one is damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.checkpoint.manifest import CheckpointError, write_manifest
from megatron.checkpoint.resume import LoadOptions, load_checkpoint


def _step(save: Path, iteration: int, *, complete: bool = True) -> Path:
    tag_dir = save / f"global_step{iteration}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        write_manifest(tag_dir, iteration)
    return tag_dir


def _load(save: Path, log: list[str] | None = None):
    messages = [] if log is None else log
    return load_checkpoint(None, LoadOptions(str(save)), tracker=None, log=messages.append)


def test_no_checkpoint_starts_from_scratch(tmp_path):
    log: list[str] = []
    assert _load(tmp_path / "missing", log) is None
    assert _load(tmp_path, log) is None
    assert all("starting from scratch" in line for line in log) and len(log) == 2


def test_checkpoints_without_latest_stop_the_run_and_are_named(tmp_path):
    _step(tmp_path, 2)
    _step(tmp_path, 4)
    _step(tmp_path, 6, complete=False)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as info:
        _load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: holds global_step2, global_step4, global_step6 "
                              "but no 'latest' file; the newest complete one is global_step4")
    assert "\n" not in message
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_latest_cannot_point_outside_the_save_directory(tmp_path):
    save = tmp_path / "save"
    _step(tmp_path, 3)  # a checkpoint next to the save directory, not in it
    save.mkdir()
    for tag in ("../global_step3", "/etc", "..", "a\\b"):
        (save / "latest").write_text(tag)
        with pytest.raises(CheckpointError, match="not a checkpoint directory inside"):
            _load(save)


def test_a_damaged_latest_checkpoint_suggests_the_previous_complete_one(tmp_path):
    _step(tmp_path, 2)
    _step(tmp_path, 4)
    (tmp_path / "latest").write_text("global_step6")  # the directory is gone
    with pytest.raises(CheckpointError, match=r"global_step6: incomplete checkpoint .*newest "
                       r"complete checkpoint besides it is .*global_step4 \(write 'global_step4'"):
        _load(tmp_path)
    (tmp_path / "latest").write_text("global_step4")
    (tmp_path / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"w")  # truncated
    with pytest.raises(CheckpointError, match=r"damaged .*besides it is .*global_step2"):
        _load(tmp_path)


def test_a_fresh_prefix_may_be_missing_and_nothing_else(tmp_path):
    """A reward model started from a language model: its head keeps its initial values;
    any other entry that does not fit is still one line naming it."""
    import torch

    from megatron.checkpoint.resume import _tolerate_fresh

    class Engine:
        def __init__(self) -> None:
            self.module = torch.nn.Module()
            self.module.body = torch.nn.Linear(2, 2)
            self.module.reward_head = torch.nn.Linear(2, 1)

    engine = Engine()
    head = engine.module.reward_head.weight.detach().clone()
    lm = {"body.weight": torch.ones(2, 2), "body.bias": torch.zeros(2)}
    missing: list[str] = []
    with _tolerate_fresh(engine, tmp_path, ("reward_head.",), missing):
        engine.module.load_state_dict(lm, strict=True)
    assert missing == ["reward_head.weight", "reward_head.bias"]
    assert torch.equal(engine.module.body.weight, torch.ones(2, 2))
    assert torch.equal(engine.module.reward_head.weight, head)
    assert "load_state_dict" not in vars(engine.module)  # the wrapper is gone afterwards
    with pytest.raises(CheckpointError, match="body.bias is missing from the checkpoint"), \
            _tolerate_fresh(engine, tmp_path, ("reward_head.",), []):
        engine.module.load_state_dict({"body.weight": torch.ones(2, 2)}, strict=True)
    with pytest.raises(CheckpointError, match="extra.weight is in the checkpoint but not"), \
            _tolerate_fresh(engine, tmp_path, ("reward_head.",), []):
        engine.module.load_state_dict({**lm, "extra.weight": torch.ones(1)}, strict=True)
