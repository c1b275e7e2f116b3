"""Launch planning: hosts and slots, the DeepSpeed runner argv and each backend's command."""

from __future__ import annotations

import pytest

from megatron.launch.plan import backend_command, plan_launch
from megatron.neox_arguments import ConfigError
from megatron.neox_arguments.groups_deepspeed import LauncherArgs

ARGS = ["--neox_config", "BLOB"]


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nworker-0 slots=4\nworker-1 slots=4\n")
    return str(path)


def plan(**kw):
    gpu = kw.pop("gpu", False)
    return plan_launch(LauncherArgs(**kw), "train.py", ARGS, gpu=gpu, local_device_count=0 if not gpu else 8)


def opt(argv, flag):
    return argv[argv.index(flag) + 1]


def test_local_cpu_launch_defaults_to_one_rank():
    p = plan()
    assert p.world_size == 1 and p.hostfile is None
    assert p.argv[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert opt(p.argv, "--num_gpus") == "1"
    assert p.argv[-3:] == ["train.py", "--neox_config", "BLOB"]
    assert p.env["DS_ACCELERATOR"] == "cpu"
    assert backend_command(p) is None


def test_local_cpu_ranks_from_num_gpus():
    p = plan(num_gpus=2, master_port=29600)
    assert p.world_size == 2
    assert opt(p.argv, "--num_gpus") == "2"
    assert opt(p.argv, "--master_port") == "29600"


def test_local_gpu_launch_uses_every_device():
    p = plan(gpu=True)
    assert p.world_size == 8
    assert "--num_gpus" not in p.argv


def test_hostfile_include_exclude(hostfile):
    p = plan(hostfile=hostfile)
    assert p.world_size == 8 and p.multi_node
    assert opt(p.argv, "--hostfile") == hostfile
    p = plan(hostfile=hostfile, include="worker-1:0,1")
    assert p.resources == {"worker-1": [0, 1]} and p.world_size == 2
    assert opt(p.argv, "--include") == "worker-1:0,1"
    p = plan(hostfile=hostfile, exclude="worker-0")
    assert p.resources == {"worker-1": [0, 1, 2, 3]}
    p = plan(hostfile=hostfile, num_nodes=1, num_gpus=2)
    assert p.resources == {"worker-0": [0, 1]}
    assert opt(p.argv, "--num_nodes") == "1"


def test_bad_launcher_settings(hostfile, tmp_path):
    with pytest.raises(ConfigError, match="hostfile: .*missing not found"):
        plan(hostfile=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("worker-0 gpus=4\n")
    with pytest.raises(ConfigError, match="bad hostfile"):
        plan(hostfile=str(bad))
    with pytest.raises(ConfigError, match="include/exclude cannot be combined"):
        plan(hostfile=hostfile, include="worker-0", num_gpus=1)
    with pytest.raises(ConfigError, match="include"):
        plan(hostfile=hostfile, include="worker-9")
    with pytest.raises(ConfigError, match="need a hostfile"):
        plan(num_nodes=2)


def test_pdsh_command(hostfile):
    p = plan(hostfile=hostfile, master_addr="10.0.0.1", launcher="pdsh")
    cmd = backend_command(p)
    assert cmd[:2] == ["pdsh", "-S"] and opt(cmd, "-w") == "worker-0,worker-1"
    assert "deepspeed.launcher.launch" in cmd and "--node_rank=%n" in cmd
    assert "--master_addr=10.0.0.1" in cmd
    assert cmd[-3:] == ["train.py", "--neox_config", "BLOB"]


def test_openmpi_command(hostfile):
    cmd = backend_command(plan(hostfile=hostfile, master_addr="10.0.0.1", launcher="openmpi"))
    assert cmd[0] == "mpirun" and opt(cmd, "-n") == "8" and opt(cmd, "-hostfile") == hostfile
    assert cmd[-3:] == ["train.py", "--neox_config", "BLOB"]


def test_mvapich_command(hostfile):
    cmd = backend_command(plan(hostfile=hostfile, master_addr="10.0.0.1", launcher="mvapich"))
    assert cmd[0] == "mpirun" and opt(cmd, "-np") == "8" and opt(cmd, "-ppn") == "4"


def test_slurm_command_with_comment_and_account(hostfile):
    p = plan(hostfile=hostfile, master_addr="10.0.0.1", launcher="slurm", comment="run-7",
             account="proj")
    assert opt(p.argv, "--launcher_args") == "--comment=run-7 --account=proj"
    cmd = backend_command(p)
    assert cmd[:3] == ["srun", "-n", "8"]
    assert "--comment=run-7" in cmd and "--account=proj" in cmd
    assert cmd[-3:] == ["train.py", "--neox_config", "BLOB"]


def test_force_multi_on_one_node(tmp_path):
    path = tmp_path / "one"
    path.write_text("node-a slots=2\n")
    p = plan(hostfile=str(path), force_multi=True, master_addr="127.0.0.1", no_ssh_check=True)
    assert "--force_multi" in p.argv and "--no_ssh_check" in p.argv
    assert backend_command(p)[0] == "pdsh"
