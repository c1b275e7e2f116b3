"""launcher: slurm for real: a throwaway one-node Slurm (slurmctld + slurmd, auth/none);
``salloc -n 2 python deepy.py --launcher slurm ...`` -> DeepSpeed's runner -> srun -> 2 tasks
that take rank, world size and rendezvous from the SLURM_* variables (deepspeed_slurm)."""

from __future__ import annotations

import sys

import pytest
from launch_helpers import (
    START_TIMEOUT,
    Job,
    assert_job_died,
    assert_trained,
    build_corpus,
    free_master_port,
    kill_rank_mid_training,
    ranks,
    require_tools,
    wait_for,
    write_job_config,
)
from local_cluster import SLURM_TOOLS, Slurm, which

pytestmark = [pytest.mark.launchers, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_tools(*SLURM_TOOLS, root=True)
    with Slurm(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def slurm_job(tmp_path, corpus, slurm, **values) -> Job:
    cfg = write_job_config(tmp_path / "job.yml", corpus, **values)
    return Job(["--launcher", "slurm", "--master_port", free_master_port(), "train.py",
                "configs/tiny_neox.yml", cfg], tmp_path / "out.txt", env=slurm.env(),
               prefix=[which("salloc"), "-n", "2", "--overcommit", "--quiet"])


def test_slurm_trains_two_tasks(tmp_path, corpus, slurm):
    job = slurm_job(tmp_path, corpus, slurm, train_iters=10)
    try:
        wait_for(lambda: sorted(ranks(job.mark)) == [0, 1], START_TIMEOUT, "tasks 0 and 1", [job])
        for rank, proc in ranks(job.mark).items():
            env = proc.environ()
            assert env["SLURM_PROCID"] == str(rank) and env["SLURM_NTASKS"] == "2"
            assert "RANK" not in env  # rank and world come from SLURM_* (deepspeed_slurm)
            assert any(p.name() == "slurmstepd" for p in proc.parents())  # started by srun
        code = job.wait()
    finally:
        job.kill()
    assert_trained(job, code, iterations=10)
    out = job.output()
    assert "deepy.py: hostfile generated from Slurm job" in out
    assert "deepy.py: deepspeed_slurm: true" in out
    assert "cmd = srun -n 2" in out
    assert "ranks: 2 = pipeline 1 x tensor 1 x data 2" in out


def test_slurm_task_killed_mid_training_ends_the_job(tmp_path, corpus, slurm):
    job = slurm_job(tmp_path, corpus, slurm, train_iters=2000)
    try:
        killed_at = kill_rank_mid_training([job], job.mark, rank=1)
        assert_job_died(job, killed_at, rank=1)
    finally:
        job.kill()
    assert "srun: error:" in job.output() and "task 1" in job.output()


def test_scancel_term_saves_exits_0_and_resumes_with_equal_losses(tmp_path, corpus, slurm):
    """Slurm preemption: ``scancel --signal=TERM`` reaches every task (and its children) of the
    job step. The ranks agree on a step, save there, the job exits 0 with one line naming the
    checkpoint, and a resume continues with the losses of an uninterrupted run."""
    import json
    import re
    import subprocess

    from launch_helpers import ROOT

    ckpt = tmp_path / "ckpt"
    common = {"lr_decay_style": "constant", "warmup": 0.0, "train_iters": 100000,
              "save": str(ckpt), "load": str(ckpt), "num_workers": 2}

    def logged(run: str) -> dict[int, float]:
        path = tmp_path / run / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        return {r["iteration"]: r["lm_loss"] for r in rows if r.get("type") == "train"}

    job = slurm_job(tmp_path, corpus, slurm, log_dir=str(tmp_path / "first"), **common)
    try:
        wait_for(lambda: len(logged("first")) >= 2, START_TIMEOUT, "two iterations", [job])
        job_id = next(iter(ranks(job.mark).values())).environ()["SLURM_JOB_ID"]
        subprocess.run([which("scancel"), "--signal=TERM", job_id], check=True,
                       env=slurm.env(), timeout=30)
        code = job.wait()
    finally:
        job.kill()
    out = job.output()
    assert code == 0, job.tail()
    assert "Traceback" not in out, job.tail()
    stop = re.search(r"^deepy\.py: the job stopped on SIGTERM at iteration (\d+); "
                     r"checkpoint: (\S+)$", out, re.M)
    assert stop, job.tail()
    stopped_at = int(stop.group(1))
    assert stop.group(2) == str(ckpt / f"global_step{stopped_at}")
    assert stopped_at == max(logged("first"))
    assert (ckpt / "latest").read_text() == f"global_step{stopped_at}"

    resumed = slurm_job(tmp_path, corpus, slurm, log_dir=str(tmp_path / "resumed"),
                        exit_interval=stopped_at + 2, **common)
    try:
        assert resumed.wait() == 0, resumed.tail()
    finally:
        resumed.kill()
    # the uninterrupted reference: the same two ranks in one go, without Slurm
    ref_cfg = write_job_config(tmp_path / "ref.yml", corpus, log_dir=str(tmp_path / "ref"),
                               **{**common, "save": None, "load": None, "num_gpus": 2,
                                  "exit_interval": stopped_at + 2})
    ref = subprocess.run([sys.executable, "deepy.py", "--master_port", free_master_port(),
                          "train.py", "configs/tiny_neox.yml", ref_cfg], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = logged("ref")
    got = {**logged("first"), **logged("resumed")}
    assert sorted(got) == list(range(1, stopped_at + 3)) == sorted(reference)
    for it, loss in got.items():
        assert loss == pytest.approx(reference[it], abs=1e-6, rel=0), it
