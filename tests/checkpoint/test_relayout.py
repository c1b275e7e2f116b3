"""Layout metadata in checkpoints, the model-shape check on load, and resharding a ZeRO-0
checkpoint's weights and Adam moments onto tensor-parallel ranks (in one process)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_helpers import build, config_from_values

from megatron.checkpoint.manifest import CheckpointError, atomic_write, write_manifest
from megatron.checkpoint.relayout import (
    Layout,
    RunLayout,
    apply_full_state,
    model_shape,
    read_full_state,
    read_layout,
    write_layout,
)
from megatron.checkpoint.reshard import split_tp
from megatron.checkpoint.resume import LoadOptions, load_checkpoint


class FakeEngine:
    """What the checkpoint code reads of DeepSpeed's engine at ZeRO 0: the module, the
    optimizer, the file names, and a ``load_checkpoint`` that loads the module strictly."""

    def __init__(self, module: torch.nn.Module, optimizer: Any = None):
        self.module, self.optimizer = module, optimizer

    def _get_ckpt_name(self, save_dir: str, tag: str) -> str:
        return os.path.join(save_dir, tag, "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict]:
        path = self._get_ckpt_name(load_dir, tag)
        self.module.load_state_dict(torch.load(path, weights_only=False)["module"])
        return path, {}


def run_of(cfg: Any, tp: int = 1, tp_rank: int = 0) -> RunLayout:
    return RunLayout(Layout(tp=tp, pp=0, dp=1, zero_stage=0), cfg.model,
                     model_shape(cfg.model, cfg.tokenizer.padded_vocab_size), rank=tp_rank,
                     tp_rank=tp_rank)


def save(tmp: Path, cfg: Any, *, step: bool = True) -> tuple[Path, FakeEngine]:
    """A ZeRO-0, TP=1 checkpoint as the trainer writes it, after one optimizer step."""
    model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    if step:
        tokens = torch.randint(0, 500, (2, 8))
        model(tokens).float().pow(2).mean().backward()
        opt.step()
    engine = FakeEngine(model, opt)
    tag_dir = tmp / "global_step3"
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 3,
                "consumed_train_samples": 24, "lr_scheduler": {"num_iters": 3}},
               tag_dir / "mp_rank_00_model_states.pt")
    write_layout(tag_dir, engine, run_of(cfg))
    write_manifest(tag_dir, 3)
    atomic_write(tmp / "latest", tag_dir.name)
    return tag_dir, engine


@pytest.fixture(scope="module")
def cfg():
    return config_from_values(num_kv_heads=2, activation="swiglu", intermediate_size=48)


def test_the_layout_and_model_shape_are_recorded(tmp_path, cfg):
    tag_dir, _ = save(tmp_path, cfg, step=False)
    info = json.loads((tag_dir / "layout.json").read_text())
    assert (info["tp"], info["pp"], info["dp"], info["zero_stage"], info["world_size"]) == \
        (1, 0, 1, 0, 1)
    assert info["model"]["num_attention_heads"] == 4 and info["model"]["num_kv_heads"] == 2
    assert info["model"]["hidden_size"] == 32 and info["model"]["padded_vocab_size"] == 512
    rank = json.loads((tag_dir / "layout" / "rank_00000.json").read_text())
    assert rank["model_file"] == "mp_rank_00_model_states.pt"
    assert rank["optimizer_order"][0] in rank["names"]
    assert "layout.json" in json.loads((tag_dir / "manifest.json").read_text())["files"]


def test_a_changed_number_of_heads_stops_with_one_line(tmp_path, cfg):
    tag_dir, _ = save(tmp_path, cfg, step=False)
    other = config_from_values(num_kv_heads=2, activation="swiglu", intermediate_size=48,
                               num_attention_heads=8)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(None, LoadOptions(str(tmp_path), layout=run_of(other)), tracker=None,
                        log=lambda _: None)
    message = str(info.value)
    assert message.startswith(f"{tag_dir}: num_attention_heads is 4 in the checkpoint but 8 "
                              "in the config")
    assert "\n" not in message


def test_a_state_dict_that_does_not_fit_names_the_key_and_both_shapes(tmp_path, cfg):
    save(tmp_path, cfg, step=False)
    wider = config_from_values(num_kv_heads=2, activation="swiglu", intermediate_size=64)
    engine = FakeEngine(build(wider))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(engine, LoadOptions(str(tmp_path), layout=run_of(wider)),
                        tracker=None, log=lambda _: None)
    message = str(info.value)
    assert message == (f"{tmp_path / 'global_step3'}: layers.0.mlp.dense_h_to_4h.weight has shape "
                       "[32, 32] in the checkpoint but [42, 32] in the model of the config "
                       "(config/architecture mismatch)")


@pytest.mark.parametrize("damage", ["garbled", "rank file missing"])
def test_damaged_layout_metadata_is_one_line_naming_the_file(tmp_path, cfg, damage):
    tag_dir, _ = save(tmp_path, cfg, step=False)
    if damage == "garbled":
        (tag_dir / "layout.json").write_text('{"tp": "two"}')
        expected = f"{tag_dir / 'layout.json'}: unreadable layout metadata"
    else:
        (tag_dir / "layout" / "rank_00000.json").unlink()
        expected = f"{tag_dir / 'layout.json'}: records 1 ranks"
    write_manifest(tag_dir, 3)  # the damage happened before the manifest was written
    with pytest.raises(CheckpointError) as info:
        read_layout(tag_dir)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_zero0_weights_and_moments_reshard_onto_tensor_parallel_ranks(tmp_path, cfg):
    tag_dir, engine = save(tmp_path, cfg)
    saved = read_layout(tag_dir)
    assert saved is not None
    full = read_full_state(tag_dir, saved, cfg.model, with_optim=True)
    assert full.client_state["consumed_train_samples"] == 24
    assert "lr_scheduler" in full.client_state
    names = dict(engine.module.named_parameters())
    for name, param in names.items():
        state = engine.optimizer.state[param]
        assert torch.equal(full.weights[name], param.detach())
        assert torch.equal(full.moments["exp_avg_sq"][name], state["exp_avg_sq"])
    moments = {n: engine.optimizer.state[p]["exp_avg"] for n, p in names.items()}
    want_weights = split_tp({n: p.detach() for n, p in names.items()}, cfg.model, 2)
    want_moments = split_tp(moments, cfg.model, 2)
    for tp_rank in range(2):
        model = build(cfg, tp_size=2, tp_rank=tp_rank, seed=7)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        apply_full_state(FakeEngine(model, opt), full, run_of(cfg, 2, tp_rank), tag_dir,
                         with_optim=True)
        for name, param in model.named_parameters():
            assert torch.equal(param.detach(), want_weights[tp_rank][name]), name
            assert torch.equal(opt.state[param]["exp_avg"], want_moments[tp_rank][name]), name
            assert float(opt.state[param]["step"]) == 1.0


def test_an_unrecorded_checkpoint_of_another_layout_is_one_line(tmp_path, cfg):
    """A checkpoint from before layouts were recorded, loaded at another ZeRO stage: DeepSpeed
    looks for a file of its own layout, which is not there."""
    tag_dir, _ = save(tmp_path, cfg, step=False)
    (tag_dir / "layout.json").unlink()
    write_manifest(tag_dir, 3)

    class ZeroEngine(FakeEngine):
        def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str, dict]:
            torch.load(Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
            return "", {}

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ZeroEngine(build(cfg)), LoadOptions(str(tmp_path), layout=run_of(cfg)),
                        tracker=None, log=lambda _: None)
    assert str(info.value).startswith(
        f"{tag_dir}: has no zero_pp_rank_0_mp_rank_00_model_states.pt for this parallel layout")
