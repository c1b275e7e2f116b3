"""Stopping on a signal through deepy.py, wherever the signal lands: the whole process group
twice in a row (``kill -TERM -PGID`` then Ctrl-C), the ranks alone, deepy.py alone. Each stop saves a
checkpoint at a step boundary agreed by the ranks and exits 0 with one line naming the signal
and the checkpoint; the next segment resumes from it with the losses of an uninterrupted run.
The Slurm delivery (``scancel --signal=TERM``) is in tests/launch/test_launch_slurm.py."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    kill_group,
    losses,
    records,
    run_deepy,
    start_deepy,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

# constant LR and a run length no segment reaches: every segment has the same schedule
TRAIN = {"train_iters": 100000, "num_gpus": 2, "num_workers": 2, "hidden_dropout": 0.1,
         "lr_decay_style": "constant", "warmup": 0.0,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.002}}}
REFERENCE_ITERS = 120
STOP_RE = re.compile(r"^deepy\.py: the job stopped on (SIG\w+) at iteration (\d+); "
                     r"checkpoint: (\S+)$", re.M)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run: REFERENCE_ITERS iterations (exit_interval) in one go."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    cfg = write_config(tmp / "run.yml", base_values(corpus, run, exit_interval=REFERENCE_ITERS,
                                                    **TRAIN))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 0, explain(proc)
    got = losses(run)
    assert sorted(got) == list(range(1, REFERENCE_ITERS + 1))
    return got


def _ranks(deepy_pid: int) -> list[psutil.Process]:
    """The training processes themselves (children of the rank guards), not their launchers
    or data-loader workers."""
    found = []
    for proc in psutil.Process(deepy_pid).children(recursive=True):
        try:
            cmd, parent = proc.cmdline(), proc.parent()
            if cmd[1:3] == ["-u", "train.py"] and "megatron.launch.rank_guard" in \
                    parent.cmdline():
                found.append(proc)
        except (psutil.Error, IndexError, AttributeError):
            continue
    return found


def _deliver(how: str, deepy_pid: int) -> str:
    """Send the stop signal(s); returns the signal the final line should name."""
    if how == "group-twice":  # a batch system's SIGTERM to the group, then Ctrl-C as well
        os.killpg(deepy_pid, signal.SIGTERM)
        time.sleep(0.2)
        os.killpg(deepy_pid, signal.SIGINT)
        return "SIGTERM"
    if how == "ranks":
        ranks = _ranks(deepy_pid)
        assert len(ranks) == 2, ranks
        for proc in ranks:
            proc.send_signal(signal.SIGTERM)
        return "SIGTERM"
    assert how == "deepy"
    os.kill(deepy_pid, signal.SIGTERM)
    return "SIGTERM"


def _run_chain(corpus, tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    done = 0
    for segment, how in enumerate(("group-twice", "ranks", "deepy")):
        run = tmp_path / f"segment{segment}"
        cfg = write_config(tmp_path / f"s{segment}.yml", base_values(
            corpus, run, save=str(ckpt), load=str(ckpt), **TRAIN))
        log = tmp_path / f"out{segment}.txt"
        proc = start_deepy("configs/tiny_neox.yml", cfg, log=log)
        try:
            wait_for(lambda run=run: len(losses(run)) >= 2, 240, f"{how}: two iterations")
            name = _deliver(how, proc.pid)
            code = proc.wait(timeout=180)
        finally:
            kill_group(proc)
        out = log.read_text()
        assert code == 0, f"{how}: exit {code}\n{out[-3000:]}"
        assert "Traceback" not in out, f"{how}:\n{out[-3000:]}"
        stops = STOP_RE.findall(out)
        assert len(stops) == 1, f"{how}:\n{out[-3000:]}"
        stopped_name, stopped_at, where = stops[0][0], int(stops[0][1]), stops[0][2]
        assert stopped_name == name, how
        got = losses(run)
        assert stopped_at == max(got) <= REFERENCE_ITERS, how
        assert min(got) == done + 1, f"{how}: resumed at {min(got)}, not after {done}"
        assert where == str(ckpt / f"global_step{stopped_at}")
        assert (ckpt / "latest").read_text() == f"global_step{stopped_at}"
        assert (ckpt / f"global_step{stopped_at}" / "manifest.json").is_file()
        for it, loss in got.items():
            assert loss == pytest.approx(reference[it], abs=1e-6, rel=0), (how, it)
        consumed = [r["consumed_samples"] for r in records(run)]
        assert consumed == [8 * it for it in sorted(got)], how  # no sample replayed or skipped
        done = stopped_at
    return ckpt, done


@pytest.fixture(scope="module")
def stopped(corpus, tmp_path_factory, reference):
    """The chain of stopped segments: (checkpoint directory, last stop iteration)."""
    return _run_chain(corpus, tmp_path_factory.mktemp("chain"), reference)


def test_every_delivery_saves_exits_0_and_resumes_with_equal_losses(stopped):
    """The chain itself asserts each stop and each resume (see _run_chain)."""
    ckpt, done = stopped
    assert (ckpt / "latest").read_text() == f"global_step{done}"


def test_the_last_stop_resumes_and_kill_9_of_the_group_takes_the_ranks_down(
        corpus, tmp_path, stopped, reference):
    """The last stop resumes too (equal losses); then the job gets SIGKILL. It runs in a
    process group of its own (so that a signal to deepy.py's group is passed on once, by
    deepy.py), yet a SIGKILL of that group must still end every rank."""
    ckpt, done = stopped
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yml", base_values(corpus, run, load=str(ckpt), **TRAIN))
    proc = start_deepy("configs/tiny_neox.yml", cfg, log=tmp_path / "out.txt")
    try:
        wait_for(lambda: len(losses(run)) >= 2, 240, "two iterations")
        got = losses(run)
        assert min(got) == done + 1
        for it in (done + 1, done + 2):
            assert got[it] == pytest.approx(reference[it], abs=1e-6, rel=0), it
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2
        everything = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _gone, alive = psutil.wait_procs(everything, timeout=20)
        assert not alive, [p.pid for p in alive]
    finally:
        kill_group(proc)
