"""The checks deepy.py makes before it starts a launcher: the launcher's tools, ssh to the
hosts. Every failure is one line that says what to do, never the runner's traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.launch.plan import plan_launch
from megatron.launch.preflight import preflight, ssh_hosts
from megatron.neox_arguments import ConfigError
from megatron.neox_arguments.groups_deepspeed import LauncherArgs

pytestmark = pytest.mark.launchers
ROOT = Path(__file__).resolve().parents[2]


def plan(**kw):
    return plan_launch(LauncherArgs(**kw), "train.py", ["--neox_config", "X"], gpu=False,
                       local_device_count=0, environ={"HOME": "/nonexistent"})


def hostfile(tmp_path, text):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


def never_reached(host):
    raise AssertionError(f"no ssh expected, asked for {host}")


def test_missing_launcher_tool_is_one_line(tmp_path):
    p = plan(hostfile=hostfile(tmp_path, "localhost slots=2\n"), launcher="openmpi")
    with pytest.raises(ConfigError) as err:
        preflight(p, which=lambda tool: None if tool == "ompi_info" else "/usr/bin/" + tool,
                  reach=never_reached)
    assert str(err.value) == ("launcher: openmpi needs ompi_info, not found on PATH: install "
                              "it (Debian: apt-get install openmpi-bin) or pick another launcher")
    # a local mpirun launch needs no ssh, and the runner keeps the plan's argv
    ok = preflight(p, which=lambda tool: "/usr/bin/" + tool, reach=never_reached)
    assert ok.argv == p.argv and ssh_hosts(p) == []


def test_unreachable_host_is_one_line_and_a_reachable_one_skips_the_runner_check(tmp_path):
    path = hostfile(tmp_path, "worker-0 slots=1\nworker-1 slots=1\n")
    p = plan(hostfile=path, master_addr="10.0.0.1")
    assert ssh_hosts(p) == ["worker-0", "worker-1"] and "--no_ssh_check" not in p.argv
    with pytest.raises(ConfigError, match=rf"hostfile: {path}: host worker-0 is not reachable "
                       r"by passwordless ssh \(Permission denied\): set up ssh keys"):
        preflight(p, which=lambda tool: "/usr/bin/" + tool,
                  reach=lambda host: "Permission denied")
    checked = preflight(p, which=lambda tool: "/usr/bin/" + tool, reach=lambda host: None)
    assert "--no_ssh_check" in checked.argv
    assert checked.argv.index("--no_ssh_check") < checked.argv.index("train.py")
    # mpirun reaches remote hosts over ssh too; srun does not
    assert ssh_hosts(plan(hostfile=path, launcher="openmpi")) == ["worker-0", "worker-1"]
    assert ssh_hosts(plan(hostfile=path, launcher="slurm")) == []


def test_deepy_launch_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    """For real, from deepy.py's own entry point: ssh to a name that cannot resolve, a bad
    hostfile line, and launcher: openmpi where mpirun is not on PATH."""
    from launch_helpers import build_corpus

    from megatron.launch.cli import main

    data = build_corpus(tmp_path / "corpus")
    monkeypatch.chdir(ROOT)
    path = hostfile(tmp_path, "node-a.invalid slots=1\nnode-b.invalid slots=1\n")
    code = main(["-H", path, "--master_addr", "10.0.0.1", "train.py", "configs/tiny_neox.yml",
                 "--tokenizer_type", "CharLevelTokenizer", "--data_path", data])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"deepy.py: error: hostfile: {path}: host node-a.invalid is not "
                               f"reachable by passwordless ssh (")

    def one_line(*argv):
        code = main([*argv, "train.py", "configs/tiny_neox.yml", "--tokenizer_type",
                     "CharLevelTokenizer", "--data_path", data])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err, err
        return err

    bad = hostfile(tmp_path, "localhost slots=two\n")
    assert one_line("-H", bad).startswith(f"deepy.py: error: {bad}: bad hostfile (")
    local = hostfile(tmp_path, "localhost slots=2\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert one_line("-H", local, "--launcher", "openmpi") == (
        "deepy.py: error: launcher: openmpi needs mpirun and ompi_info, not found on PATH: "
        "install it (Debian: apt-get install openmpi-bin) or pick another launcher")
