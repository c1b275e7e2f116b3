"""kill -9 of a training process at 20 seeded random moments while it saves every step, 10
with synchronous and 10 with asynchronous saves (each moment: a seeded delay after a save has
begun, its directory created): after every kill ``latest`` names a complete
checkpoint whose checksums verify, the next run resumes from the newest complete checkpoint,
and every loss any of the runs logged equals the uninterrupted run's loss at that
iteration."""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron.checkpoint.manifest import CheckpointError, read_latest, verify_checkpoint
from megatron.checkpoint.writer import complete_checkpoints
from tests.checkpoint.kill_harness import start_training, train_records

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from e2e_helpers import ROOT, base_values, build_char_corpus  # noqa: E402

ITERS = 30
KILLS_PER_MODE = 10


def _config(tmp: Path, corpus: str, run: Path, **extra: object) -> list[str]:
    values = base_values(corpus, run, save=str(run / "ckpt"), load=str(run / "ckpt"),
                         train_iters=ITERS, save_interval=1, keep_last_n_checkpoints=3,
                         hidden_size=32, num_attention_heads=2, hidden_dropout=0.1, **extra)
    path = tmp / f"{run.name}.yml"
    path.write_text(yaml.safe_dump(values))
    return ["configs/tiny_neox.yml", str(path)]


def _run_to_end(configs: list[str], log: Path) -> None:
    proc = start_training(configs, log, ROOT)
    proc.join(300)
    assert proc.exitcode == 0, log.read_text()[-3000:]


def _newest_complete(ckpt: Path) -> str | None:
    for _, path in reversed(complete_checkpoints(ckpt)):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path.name
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    corpus = build_char_corpus(tmp, max_docs=60)
    ref = tmp / "reference"
    _run_to_end(_config(tmp, corpus, ref), tmp / "reference.log")
    reference = {r["iteration"]: r["lm_loss"] for r in train_records(ref)}
    assert sorted(reference) == list(range(1, ITERS + 1))
    return tmp, corpus, reference


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_at_random_moments_during_saves(setup, mode):
    tmp, corpus, reference = setup
    rng = random.Random(f"kill-{mode}")
    run = tmp / mode
    ckpt = run / "ckpt"
    configs = _config(tmp, corpus, run, async_save=mode == "async")
    log = tmp / f"{mode}.log"
    expected: list[str | None] = [None]  # what each run must resume from
    mid_save = killed = 0
    for _ in range(KILLS_PER_MODE):
        seen = len(train_records(run))
        proc = start_training(configs, log, ROOT)
        deadline = time.time() + 120
        while len(train_records(run)) == seen and proc.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        before = {p.name for p in ckpt.glob("global_step*")}
        while proc.is_alive() and time.time() < deadline and \
                not {p.name for p in ckpt.glob("global_step*")} - before:
            time.sleep(0.005)  # until the next save has begun (its directory appears)
        time.sleep(rng.uniform(0.0, 0.08))  # the seeded kill moment
        if proc.is_alive():
            proc.kill()  # SIGKILL
            killed += 1
        proc.join(60)
        assert proc.exitcode in (0, -signal.SIGKILL), log.read_text()[-3000:]
        tag = read_latest(ckpt)
        newest = _newest_complete(ckpt)
        if tag is None:  # killed during the first save
            assert newest is None
        else:
            verify_checkpoint(ckpt / tag)  # latest is complete: sizes and checksums
        done = 0 if tag is None else int(tag.removeprefix("global_step"))
        mid_save += any(int(p.name.removeprefix("global_step")) > done
                        for p in ckpt.glob("global_step*"))
        expected.append(newest)
        if newest == f"global_step{ITERS}":
            break
    _run_to_end(configs, log)
    resumed_from = []  # per run, in order: the checkpoint it loaded, None from scratch
    for line in log.read_text().splitlines():
        if "starting from scratch" in line:
            resumed_from.append(None)
        elif line.startswith("loaded checkpoint "):
            resumed_from.append(Path(line.split()[2]).name)
    assert resumed_from == expected, (resumed_from, expected)
    print(f"{mode}: {killed} kills, {mid_save} with a save in progress")
    assert killed >= KILLS_PER_MODE - 2 and mid_save >= 1, (killed, mid_save)
    records = train_records(run)
    assert max(r["iteration"] for r in records) == ITERS
    for r in records:  # every loss of every run, the repeated iterations included
        assert r["lm_loss"] == pytest.approx(reference[r["iteration"]], abs=1e-6, rel=0), r
