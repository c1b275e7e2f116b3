"""launcher: pdsh for real: two "nodes" (node-a = 127.0.0.1, node-b = 127.0.0.2) reached over
ssh through a throwaway sshd; DeepSpeed's runner checks ssh, pdsh starts one rank per node."""

from __future__ import annotations

import os
import uuid

import pytest
from launch_helpers import (
    ROOT,
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
from local_cluster import SSH_TOOLS, Sshd

pytestmark = [pytest.mark.launchers, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_tools(*SSH_TOOLS, root=True)
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def pdsh_job(tmp_path, corpus, sshd, **values) -> Job:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    mark = uuid.uuid4().hex
    # The mark reaches the ranks on the "remote" nodes only through the .deepspeed_env
    # mechanism (blank lines and comments are fine: deepy.py rewrites the file).
    extra_env = tmp_path / "extra_env"
    extra_env.write_text(f"# forwarded by deepy.py\n\nLAUNCH_TEST_MARK={mark}\n"
                         "DS_ACCELERATOR=cpu\n")
    env = sshd.env()
    env["DS_ENV_FILE"] = str(extra_env)
    cfg = write_job_config(tmp_path / "job.yml", corpus, **values)
    return Job(["-H", str(hostfile), "--launcher", "pdsh", "--master_addr", "127.0.0.1",
                "--master_port", free_master_port(), "train.py", "configs/tiny_neox.yml", cfg],
               tmp_path / "out.txt", env=env, mark=mark)


def test_pdsh_trains_on_two_nodes(tmp_path, corpus, sshd):
    job = pdsh_job(tmp_path, corpus, sshd, train_iters=10)
    try:
        # ranks() finds them by the mark, which only the .deepspeed_env file carried
        wait_for(lambda: sorted(ranks(job.mark)) == [0, 1], START_TIMEOUT, "ranks 0 and 1", [job])
        for rank in ranks(job.mark).values():
            assert any(p.name() == "sshd" for p in rank.parents())  # started over ssh
            env = rank.environ()
            assert env["PYTHONPATH"].split(":")[0] == str(ROOT)  # DeepSpeed's PYTHON* export
            if "TORCH_EXTENSIONS_DIR" in os.environ:  # forwarded by deepy.py
                assert env["TORCH_EXTENSIONS_DIR"] == os.environ["TORCH_EXTENSIONS_DIR"]
        code = job.wait()
    finally:
        job.kill()
    assert_trained(job, code, iterations=10)
    out = job.output()
    assert "cmd = pdsh -S -f 1024 -w node-a,node-b" in out
    assert "node-a: iteration 10/10" in out  # rank 0's log comes back through pdsh


def test_pdsh_rank_killed_mid_training_ends_the_job(tmp_path, corpus, sshd):
    job = pdsh_job(tmp_path, corpus, sshd, train_iters=2000)
    try:
        killed_at = kill_rank_mid_training([job], job.mark, rank=1)
        assert_job_died(job, killed_at, rank=1)
    finally:
        job.kill()
    out = job.output()
    assert "node-b: [rank-guard] rank 1" in out
