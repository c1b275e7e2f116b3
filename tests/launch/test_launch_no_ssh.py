"""The launch without ssh: one ``deepy.py --no_ssh --node_rank N`` per node (as on Kubernetes),
here two process groups on loopback with one rank each, training together."""

from __future__ import annotations

import uuid

import pytest
from launch_helpers import (
    Job,
    assert_job_died,
    assert_trained,
    build_corpus,
    free_master_port,
    job_processes,
    kill_rank_mid_training,
    write_job_config,
)

pytestmark = [pytest.mark.launchers, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def node_jobs(tmp_path, corpus, **values) -> list[Job]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")  # names only label the nodes here
    cfg = write_job_config(tmp_path / "job.yml", corpus, **values)
    port = free_master_port()
    mark = uuid.uuid4().hex
    return [Job(["--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                 "--master_port", port, "-H", str(hostfile), "train.py",
                 "configs/tiny_neox.yml", cfg], tmp_path / f"node{rank}.txt", mark=mark)
            for rank in (0, 1)]


def test_two_nodes_without_ssh_train_together(tmp_path, corpus):
    jobs = node_jobs(tmp_path, corpus)
    try:
        codes = [job.wait() for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    assert_trained(jobs[0], codes[0])  # node 0 holds rank 0, which logs
    assert codes[1] == 0, jobs[1].tail()
    assert "ranks: 2 = pipeline 1 x tensor 1 x data 2" in jobs[0].output()
    for rank, job in enumerate(jobs):
        out = job.output()
        assert f"per-node launch without ssh: node {rank} of 2 (node-{rank})" in out
        assert f"node_rank={rank}" in out  # DeepSpeed's launch.py on this node
        assert "pdsh" not in out and "ssh " not in out
    assert "iteration 3/3" not in jobs[1].output()


def test_killed_rank_ends_both_nodes(tmp_path, corpus):
    jobs = node_jobs(tmp_path, corpus, train_iters=2000)
    try:
        killed_at = kill_rank_mid_training(jobs, jobs[0].mark, rank=1)
        assert_job_died(jobs[1], killed_at, rank=1)  # node 1's deepy.py names rank 1
        # node 0 loses its peer: its rank fails (gloo reports the closed connection) and its
        # deepy.py exits non-zero too, naming its own rank 0
        last = assert_job_died(jobs[0], killed_at, rank=0, names_rank=False)
        assert "rank 0 " in last
    finally:
        for job in jobs:
            job.kill()
    assert not job_processes(jobs[0].mark)
