"""launcher: openmpi for real: deepy.py -> DeepSpeed's runner -> mpirun -> 2 ranks from a
hostfile, which find their rank, world size and rendezvous with deepspeed_mpi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import (
    ROOT,
    Job,
    assert_job_died,
    assert_trained,
    build_corpus,
    free_master_port,
    kill_rank_mid_training,
    require_tools,
    write_job_config,
)

pytestmark = [pytest.mark.launchers, pytest.mark.timeout(600)]
MPI_TOOLS = ("mpirun", "ompi_info")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def mpirun_job(tmp_path: Path, corpus: str, force_multi: bool = True, **values) -> Job:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    cfg = write_job_config(tmp_path / "job.yml", corpus, **values)
    return Job(["-H", str(hostfile), "--launcher", "openmpi",
                *(["--force_multi"] if force_multi else []),
                "--master_port", free_master_port(), "train.py", "configs/tiny_neox.yml", cfg],
               tmp_path / "out.txt")


def test_openmpi_trains_two_ranks(tmp_path, corpus):
    """launcher: openmpi and a one-node hostfile ('localhost slots=2'), nothing else: the
    named launcher starts the ranks, without ssh to this machine."""
    require_tools(*MPI_TOOLS)
    job = mpirun_job(tmp_path, corpus, force_multi=False)
    code = job.wait()
    assert_trained(job, code)
    out = job.output()
    assert "deepy.py: launcher: openmpi starts the ranks (named in the config)" in out
    assert "cmd = mpirun -n 2 -hostfile" in out  # DeepSpeed's runner used mpirun
    assert "deepy.py: deepspeed_mpi: true" in out
    assert "ranks: 2 = pipeline 1 x tensor 1 x data 2" in out


def test_openmpi_rank_killed_mid_training_ends_the_job(tmp_path, corpus):
    require_tools(*MPI_TOOLS)
    job = mpirun_job(tmp_path, corpus, train_iters=2000)
    try:
        killed_at = kill_rank_mid_training([job], job.mark, rank=1)
        assert_job_died(job, killed_at, rank=1)
    finally:
        job.kill()
    out = job.output()
    assert "mpirun detected that one or more processes exited with non-zero status" in out
    assert "still running after the launcher exited" not in out  # mpirun left nothing


PROBE = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("cluster_env", {path!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
out = {out!r} + "/rank" + os.environ["OMPI_COMM_WORLD_RANK"] + ".json"
open(out, "w").write(json.dumps(mod.mpi_environment(os.environ, 29500)))
"""


@pytest.mark.parametrize("with_mpi4py", [True, False], ids=["mpi4py", "environment"])
def test_mpi_environment_under_mpirun(tmp_path, with_mpi4py):
    """Both discovery paths under a real mpirun: mpi4py (where it loads an MPI library) and
    Open MPI's variables (mpi4py hidden)."""
    require_tools(*MPI_TOOLS)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               MASTER_PORT="6123")
    if with_mpi4py:
        usable = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"],
                                capture_output=True, timeout=120).returncode == 0
        if not usable:
            message = ("mpi4py is not installed or loads no MPI library (optional: "
                       "requirements/requirements-mpi.txt)")
            if os.environ.get("CI") == "true":  # make install puts it in the venv
                pytest.fail(message)
            pytest.skip(message)
    else:
        hide = tmp_path / "hide" / "mpi4py"
        hide.mkdir(parents=True)
        (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = str(hide.parent)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    code = PROBE.format(path=str(ROOT / "megatron" / "launch" / "cluster_env.py"),
                        out=str(tmp_path))
    out = subprocess.run(["mpirun", "-n", "2", "-hostfile", str(hostfile), "--mca", "btl",
                          "self,vader,tcp", "--mca", "btl_tcp_if_include", "lo",
                          "-x", "MASTER_PORT", *(["-x", "PYTHONPATH"] if not with_mpi4py else []),
                          sys.executable, "-c", code],
                         capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(d["RANK"], d["WORLD_SIZE"], d["LOCAL_RANK"]) for d in found] == [
        ("0", "2", "0"), ("1", "2", "1")]
    assert {d["MASTER_ADDR"] for d in found} == {"127.0.0.1"}
    assert {d["MASTER_PORT"] for d in found} == {"6123"}
    assert {d.get("LOCAL_WORLD_SIZE") for d in found} == {"2"}
