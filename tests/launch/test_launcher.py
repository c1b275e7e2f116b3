"""Launch planning: hosts and slots, the DeepSpeed runner argv and each backend's command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# --------------------------------------------------------------------------- local launch


def _runner_command(runner_argv, monkeypatch):
    """The command DeepSpeed's runner itself starts for ``runner_argv`` (its process is
    replaced by a recorder)."""
    from deepspeed.launcher import runner

    started = []
    real_popen = runner.subprocess.Popen

    class Started:
        returncode = 0

        def wait(self):
            return 0

    def popen(cmd, *args, **kwargs):
        if "deepspeed.launcher.launch" not in cmd:  # e.g. lscpu for the CPU's NUMA nodes
            return real_popen(cmd, *args, **kwargs)
        started.append(list(cmd))
        return Started()

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runner.main(runner_argv)
    assert len(started) == 1
    return started[0]


@pytest.mark.parametrize("kw", [
    {},
    {"num_gpus": 2, "master_port": 29611},
    {"num_gpus": 3, "num_nodes": 1, "master_addr": "10.0.0.7", "rank_guard": True},
], ids=["one-rank", "two-ranks", "guarded"])
def test_local_cpu_launch_is_the_command_deepspeeds_runner_starts(kw, monkeypatch):
    rank_guard = kw.pop("rank_guard", False)
    p = plan_launch(LauncherArgs(**kw), "train.py", ARGS, gpu=False, local_device_count=0,
                    rank_guard=rank_guard)
    assert p.local_argv is not None and p.local_argv[1:4] == ["-u", "-m",
                                                             "deepspeed.launcher.launch"]
    assert p.local_argv == _runner_command(p.argv[4:], monkeypatch)


def test_the_runner_decides_everything_but_a_plain_local_cpu_launch(hostfile):
    assert plan(gpu=True).local_argv is None
    assert plan(hostfile=hostfile).local_argv is None
    assert plan(hostfile=hostfile, include="worker-1").local_argv is None
    assert plan(autotuning_run="tune").local_argv is None
    assert plan(detect_nvlink_pairs=True).local_argv is None
    one = plan_launch(LauncherArgs(), "train.py", ARGS, gpu=False, local_device_count=0,
                      extra_runner_args=["--bind_cores_to_rank"])
    assert one.local_argv is None


def test_deepy_dry_run_on_cpu_imports_neither_torch_nor_deepspeed():
    """deepy.py's own start-up: config validation and the launch plan need neither (seconds
    per launch); the GPU check answers without torch where no GPU can be."""
    code = (
        "import sys\n"
        "from megatron import accelerator\n"
        "possible = accelerator.gpu_possible()\n"
        "from megatron.launch import cli\n"
        "code = cli.main(['--dry-run', 'train.py', 'configs/tiny_neox.yml', '--num_gpus', '2',"
        " '--tokenizer_type', 'CharLevelTokenizer', '--data_path', '/nonexistent/data'])\n"
        "print('LOADED', sorted({'torch', 'deepspeed'} & set(sys.modules)))\n"
        "import torch\n"
        "print('GPU', possible, torch.cuda.is_available())\n"
        "sys.exit(code)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout
    assert "deepspeed.launcher.launch --world_info=" in out.stdout
    # where no GPU is possible, torch agrees there is none
    possible, available = out.stdout.split("GPU ")[1].split()
    assert possible == "True" or available == "False"
