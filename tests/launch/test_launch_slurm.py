"""launcher: slurm for real: a throwaway one-node Slurm (slurmctld + slurmd, auth/none);
``salloc -n 2 python deepy.py --launcher slurm ...`` -> DeepSpeed's runner -> srun -> 2 tasks
that take rank, world size and rendezvous from the SLURM_* variables (deepspeed_slurm)."""

from __future__ import annotations

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
