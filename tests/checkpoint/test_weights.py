"""megatron/checkpoint/weights.py: written checkpoints in both layouts read back, shared layers,
errors naming the file or key, the manifest."""

from __future__ import annotations

import json

import pytest
import torch

from megatron.checkpoint import CheckpointError
from megatron.checkpoint.weights import (
    check_against_model,
    expand_shared_layers,
    inspect_checkpoint,
    read_model_state_dict,
    read_shard,
    write_checkpoint,
)
from tests.checkpoint.checkpoint_helpers import CONFIGS, build, config_from_values


@pytest.mark.parametrize("tp,pp", [(1, 0), (2, 0), (2, 2), (1, 1)])
def test_written_checkpoints_read_back_exactly(tmp_path, tp, pp):
    cfg = config_from_values(**CONFIGS["llama_rpe_untied"])
    full = build(cfg, seed=3).state_dict()
    tag_dir = write_checkpoint(tmp_path, full, cfg.model, tp_size=tp, pipe_parallel_size=pp,
                               config_yaml="num_layers: 2\n")
    assert (tmp_path / "latest").read_text() == "global_step0"
    names = sorted(p.name for p in tag_dir.iterdir() if p.suffix == ".pt")
    mp_files = [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp * max(pp, 1))]
    assert [n for n in names if n.startswith("mp_rank")] == mp_files
    if pp:  # embed, (rpe, layer) x 2, final norm, output: 7 specs per tensor rank
        assert len([n for n in names if n.startswith("layer_")]) == 7 * tp
        assert f"layer_06-model_{tp - 1:02d}-model_states.pt" in names
    info = inspect_checkpoint(tmp_path)
    assert (info.layout, info.tp_size, info.pp_size) == ("pipeline" if pp else "plain", tp,
                                                        max(pp, 1))
    back, _ = read_model_state_dict(tag_dir, cfg.model)
    assert back.keys() == full.keys()
    for key in full:
        assert torch.equal(back[key], full[key]), key
    if tp == 2:
        rank1 = read_shard(info, 1, cfg.model)
        cfg2 = config_from_values(world_size=2, model_parallel_size=2,
                                  **CONFIGS["llama_rpe_untied"])
        reference = build(cfg2, 2, 1, seed=3).state_dict()
        assert all(torch.equal(rank1[k], reference[k]) for k in reference)


def test_shared_layers_expand_to_every_depth():
    cfg = config_from_values(num_layers=4, num_unique_layers=2, param_sharing_style="spaced")
    sd = build(cfg).state_dict()
    assert not any(k.startswith("layers.2.") for k in sd)
    out = expand_shared_layers(sd, cfg.model)
    key = "attention.query_key_value.weight"
    assert torch.equal(out[f"layers.2.{key}"], sd[f"layers.0.{key}"])
    assert torch.equal(out[f"layers.3.{key}"], sd[f"layers.1.{key}"])


def test_errors_name_the_file_or_key(tmp_path):
    cfg = config_from_values()
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        inspect_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        inspect_checkpoint(tmp_path / "empty")
    sd = build(cfg).state_dict()
    tag_dir = write_checkpoint(tmp_path / "ck", sd, cfg.model)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    with open(model_file, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: damaged"):
        inspect_checkpoint(tmp_path / "ck")
    (tag_dir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        inspect_checkpoint(tmp_path / "ck")
    wide = build(config_from_values(hidden_size=64)).state_dict()
    with pytest.raises(CheckpointError, match=r"embed.word_embeddings.weight has shape "
                       r"\[512, 32\], the config builds \[512, 64\] \(config/architecture"):
        check_against_model(sd, wide, "ck")
    gated = build(config_from_values(activation="swiglu", norm="rmsnorm")).state_dict()
    with pytest.raises(CheckpointError, match="unexpected.*input_layernorm.bias"):
        check_against_model(sd, gated, "ck")


def test_manifest_lists_every_written_file(tmp_path):
    cfg = config_from_values()
    tag_dir = write_checkpoint(tmp_path, build(cfg).state_dict(), cfg.model, tp_size=2,
                               pipe_parallel_size=2, config_yaml="x: 1\n", iteration=7)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert manifest["iteration"] == 7 and tag_dir.name == "global_step7"
    state = torch.load(tag_dir / "mp_rank_03_model_states.pt", weights_only=False)
    assert state["module"] is None and state["mp_world_size"] == 4
    assert state["checkpoint_parallel_dimensions"] == {"pp_degree": 2, "tp_degree": 2}
