"""Checksums in the manifest, verified on load; files that would run code refused; the
checkpoint to load chosen by ``iteration`` or by a ``global_stepN`` path; the background
writer's order (files, manifest, then ``latest``)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.manifest import CheckpointError, verify_checkpoint, write_manifest
from megatron.checkpoint.resume import LoadOptions, choose_checkpoint, load_checkpoint
from megatron.checkpoint.safe_load import load_file
from megatron.checkpoint.writer import SaveJob, Writer, host_copy


def _step(save: Path, iteration: int) -> Path:
    tag_dir = save / f"global_step{iteration}"
    (tag_dir / "rng").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(64.0)}}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save({"torch": torch.get_rng_state()}, tag_dir / "rng" / "rank_00000.pt")
    write_manifest(tag_dir, iteration)
    return tag_dir


def _load(save: Path) -> None:
    load_checkpoint(None, LoadOptions(str(save)), tracker=None, log=lambda _: None)


def test_manifest_records_crc32_and_size(tmp_path):
    tag_dir = _step(tmp_path, 3)
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    entry = manifest["files"]["mp_rank_00_model_states.pt"]
    assert entry["size"] == (tag_dir / "mp_rank_00_model_states.pt").stat().st_size
    assert len(entry["crc32"]) == 8
    assert verify_checkpoint(tag_dir)["iteration"] == 3


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing shard"])
def test_damage_is_one_line_naming_the_file_and_the_previous_checkpoint(tmp_path, damage):
    _step(tmp_path, 2)
    tag_dir = _step(tmp_path, 4)
    (tmp_path / "latest").write_text("global_step4")
    victim = tag_dir / "rng" / "rank_00000.pt"
    data = bytearray(victim.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        what = "damaged (CRC-32"
    elif damage == "truncated":
        victim.write_bytes(bytes(data[:-10]))
        what = "damaged ("
    else:
        victim.unlink()
        what = "missing from the checkpoint"
    with pytest.raises(CheckpointError) as info:
        _load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{victim}: {what}")
    assert f"besides it is {tmp_path / 'global_step2'}" in message
    assert "\n" not in message


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_would_run_code_is_refused_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: loading it would call ")
    assert "system" in message and "\n" not in message
    assert not (tmp_path / "pwned.txt").exists()
    torch.save({"module": {"w": torch.ones(2)}}, path)  # plain tensors load
    assert torch.equal(load_file(path)["module"]["w"], torch.ones(2))


def test_iteration_and_step_directory_choose_the_checkpoint(tmp_path):
    for it in (2, 4, 6):
        _step(tmp_path, it)
    (tmp_path / "latest").write_text("global_step6")
    log: list[str] = []
    assert choose_checkpoint(LoadOptions(str(tmp_path)), log.append) == \
        (tmp_path, "global_step6")
    assert choose_checkpoint(LoadOptions(str(tmp_path), iteration=4), log.append) == \
        (tmp_path, "global_step4")
    assert choose_checkpoint(LoadOptions(str(tmp_path / "global_step2")), log.append) == \
        (tmp_path, "global_step2")
    with pytest.raises(CheckpointError, match=r"global_step5: not found \(iteration: 5; "
                       r"checkpoints in .*: global_step2, global_step4, global_step6\)"):
        choose_checkpoint(LoadOptions(str(tmp_path), iteration=5), log.append)
    (tmp_path / "latest").write_text("global_step4")  # a save cut between manifest and latest
    assert choose_checkpoint(LoadOptions(str(tmp_path)), log.append) == \
        (tmp_path, "global_step6")
    assert "newer than global_step4" in log[-1]


def test_host_copy_is_independent_of_the_live_state():
    live = torch.zeros(4)
    state = {"module": {"a": live, "tied": live}, "step": 3, "shape": torch.Size([4])}
    copy = host_copy(state)
    live += 1
    assert torch.equal(copy["module"]["a"], torch.zeros(4))
    assert copy["module"]["a"] is copy["module"]["tied"]
    assert copy["shape"] == torch.Size([4]) and copy["step"] == 3


def test_background_writer_writes_files_then_manifest_then_latest(tmp_path):
    tag_dir = tmp_path / "global_step5"
    gate = threading.Event()

    class Slow(dict):
        def __reduce_ex__(self, protocol):  # pickling waits: the write is in flight
            gate.wait(10)
            return (dict, (dict(self),))

    (tmp_path / "latest").write_text("global_step3")
    job = SaveJob(save_dir=tmp_path, tag_dir=tag_dir, iteration=5, rank=0, world_size=1,
                  group=None, files=[(tag_dir / "model.pt", Slow(w=torch.ones(3)))],
                  entries={}, has_optimizer=True, keep_last_n=None, blocked_s=0.01)
    writer = Writer(background=True)
    assert writer.submit(job) is None
    assert writer.poll() is None
    assert (tmp_path / "latest").read_text() == "global_step3"
    assert not (tag_dir / "manifest.json").exists()
    gate.set()
    line = writer.wait()
    assert line is not None and line.startswith(
        f"saved checkpoint at iteration 5 to {tmp_path}: training blocked 0.010 s, write in "
        "the background ")
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert verify_checkpoint(tag_dir)["files"]["model.pt"]["size"] > 0
