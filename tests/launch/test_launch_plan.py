"""Launch plans for every path, the environment forwarded to ranks, cluster variables, failure
reports, the rank guard and deepy.py's supervisor. No system tools needed; seconds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron.launch.cluster_env import launched_by_mpi, mpi_environment, slurm_environment
from megatron.launch.failures import first_failure, parse_failure
from megatron.launch.plan import (
    RANK_GUARD,
    backend_command,
    parse_env_file,
    plan_launch,
    runner_exports,
)
from megatron.neox_arguments import ConfigError
from megatron.neox_arguments.groups_deepspeed import LauncherArgs

pytestmark = pytest.mark.launchers

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--neox_config", "BLOB"]


def plan(environ=None, **kw):
    gpu = kw.pop("gpu", False)
    extra = {k: kw.pop(k) for k in ("no_ssh", "node_rank", "launcher_args", "rank_guard")
             if k in kw}
    return plan_launch(LauncherArgs(**kw), "train.py", ARGS, gpu=gpu,
                       local_device_count=8 if gpu else 0,
                       environ=environ or {"HOME": "/nonexistent"}, **extra)


def opt(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.fixture
def two_nodes(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-0 slots=2\nworker-1 slots=2\n")
    return str(path)


@pytest.fixture
def one_local(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("localhost slots=2\n")
    return str(path)


# --------------------------------------------------------------------------- openmpi / mvapich


def test_openmpi_on_one_node_needs_no_ssh_and_discovers_ranks(one_local):
    p = plan(hostfile=one_local, launcher="openmpi", force_multi=True, rank_guard=True,
             master_port=29611)
    assert p.multi_node_exec and p.world_size == 2
    assert p.config_overrides == {"deepspeed_mpi": True}
    assert opt(p.argv, "--master_addr") == "127.0.0.1" and "--no_ssh_check" in p.argv
    assert opt(p.argv, "--launcher_args") == "--mca btl_tcp_if_include lo"
    assert p.argv[-4:] == [str(RANK_GUARD), "train.py", *ARGS]
    assert p.exports["MASTER_ADDR"] == "127.0.0.1" and p.exports["MASTER_PORT"] == "29611"
    assert p.files[p.env["DS_ENV_FILE"]].splitlines()[:2] == ["MASTER_ADDR=127.0.0.1",
                                                            "MASTER_PORT=29611"]
    if os.geteuid() == 0:
        assert p.env["OMPI_ALLOW_RUN_AS_ROOT"] == p.env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    cmd = backend_command(p, {"PATH": "/usr/bin"})
    assert cmd[0] == "mpirun" and opt(cmd, "-n") == "2" and opt(cmd, "-hostfile") == one_local
    assert "eth0" not in cmd and cmd[cmd.index("btl_tcp_if_include") + 1] == "lo"
    assert "MASTER_ADDR=127.0.0.1" in cmd and cmd[cmd.index("MASTER_ADDR=127.0.0.1") - 1] == "-x"
    assert cmd[-6:] == ["-u", "-m", str(RANK_GUARD), "train.py", *ARGS]


def test_openmpi_on_two_nodes_uses_the_first_host_as_master(two_nodes):
    p = plan(hostfile=two_nodes, launcher="openmpi")
    assert opt(p.argv, "--master_addr") == "worker-0"
    assert "--no_ssh_check" not in p.argv  # mpirun reaches the nodes over ssh
    assert "--launcher_args" not in p.argv
    cmd = backend_command(p, {})
    assert cmd[cmd.index("btl_tcp_if_include") + 1] == "eth0"  # DeepSpeed's default
    p = plan(hostfile=two_nodes, launcher="openmpi",
             launcher_args="--mca btl_tcp_if_include ib0 -x FOO=1")
    assert opt(p.argv, "--launcher_args") == "--mca btl_tcp_if_include ib0 -x FOO=1"
    cmd = backend_command(p, {})
    assert "eth0" not in cmd and "ib0" in cmd


def test_mpi_launchers_refuse_slot_filters(two_nodes):
    for kw in ({"num_gpus": 1}, {"num_nodes": 2}, {"include": "worker-0@worker-1"}):
        with pytest.raises(ConfigError, match="launcher: openmpi runs every slot"):
            plan(hostfile=two_nodes, launcher="openmpi", **kw)


def test_mvapich_command_exports_the_rendezvous(two_nodes):
    p = plan(hostfile=two_nodes, launcher="mvapich", master_addr="10.0.0.1")
    assert p.config_overrides == {"deepspeed_mpi": True}
    cmd = backend_command(p, {})
    assert cmd[0] == "mpirun" and opt(cmd, "-np") == "4" and opt(cmd, "-ppn") == "2"
    envs = [cmd[i + 1] for i, part in enumerate(cmd) if part == "-env"]
    assert "MASTER_ADDR=10.0.0.1" in envs and "MASTER_PORT=29500" in envs
    assert "MV2_SUPPORT_DL=1" in envs


def test_deepspeed_mpi_already_set_is_not_overridden(two_nodes):
    p = plan(hostfile=two_nodes, launcher="openmpi", deepspeed_mpi=True)
    assert p.config_overrides == {}


def test_a_named_launcher_starts_one_node_of_a_hostfile(one_local):
    """launcher: openmpi with 'localhost slots=2' goes through mpirun (no ssh: the ranks are
    local); without a hostfile the local launcher runs and the note says so."""
    p = plan(hostfile=one_local, launcher="openmpi")
    assert p.multi_node_exec and p.config_overrides == {"deepspeed_mpi": True}
    assert "--force_multi" in p.argv and "--no_ssh_check" in p.argv
    assert opt(p.argv, "--master_addr") == "127.0.0.1"
    assert backend_command(p, {})[:3] == ["mpirun", "-n", "2"]
    local = plan(launcher="openmpi")
    assert not local.multi_node_exec and "DS_ENV_FILE" not in local.env
    assert any("--force_multi starts it through openmpi" in note for note in local.notes)


def test_pdsh_on_a_one_node_local_hostfile_skips_ssh(one_local):
    """DeepSpeed's runner checks ssh to the first host of any hostfile, even when it then runs
    its local launcher: a local one-node hostfile must not need ssh to this machine."""
    p = plan(hostfile=one_local)
    assert not p.multi_node_exec and p.world_size == 2
    assert "--no_ssh_check" in p.argv and opt(p.argv, "--master_addr") == "127.0.0.1"


# --------------------------------------------------------------------------- slurm


SLURM_ALLOCATION = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]",
                    "SLURM_TASKS_PER_NODE": "4(x2)"}


def test_slurm_inside_an_allocation_generates_the_hostfile():
    p = plan(environ=SLURM_ALLOCATION, launcher="slurm", comment="run-7", account="proj")
    assert p.resources == {"gpu01": [0, 1, 2, 3], "gpu02": [0, 1, 2, 3]}
    assert p.files[p.hostfile] == "gpu01 slots=4\ngpu02 slots=4\n"
    assert "--force_multi" in p.argv and "--no_ssh_check" in p.argv
    assert opt(p.argv, "--master_addr") == "gpu01"
    assert opt(p.argv, "--launcher_args") == "--comment=run-7 --account=proj"
    assert p.env["SLURM_KILL_BAD_EXIT"] == "1"
    assert p.config_overrides == {"deepspeed_slurm": True}
    cmd = backend_command(p, {})
    assert cmd[:3] == ["srun", "-n", "8"] and "--comment=run-7" in cmd
    export = next(part for part in cmd if part.startswith("--export=ALL"))
    assert "MASTER_ADDR=gpu01" in export and "MASTER_PORT=29500" in export


def test_slurm_allocation_of_one_node_still_goes_through_srun():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS_PER_NODE": "2"}
    p = plan(environ=env, launcher="slurm")
    assert p.multi_node_exec and p.world_size == 2
    assert p.master_addr in ("127.0.0.1", "vm")  # 127.0.0.1 where this host is called vm
    assert backend_command(p, {})[:3] == ["srun", "-n", "2"]


def test_slurm_on_cpus_refuses_num_gpus(two_nodes):
    with pytest.raises(ConfigError, match="num_gpus: with launcher slurm"):
        plan(hostfile=two_nodes, launcher="slurm", num_gpus=1)
    p = plan(hostfile=two_nodes, launcher="slurm", num_gpus=2, gpu=True)
    assert opt(backend_command(p, {}), "--gpus-per-node") == "2"


def test_slurm_environment_of_a_task():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    assert slurm_environment(env, 29500) == {
        "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
        "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "4"}
    env.update(MASTER_ADDR="10.1.1.1", MASTER_PORT="6000")
    out = slurm_environment(env, 29500)
    assert out["MASTER_ADDR"] == "10.1.1.1" and out["MASTER_PORT"] == "6000"
    with pytest.raises(RuntimeError, match="SLURM_PROCID is not set"):
        slurm_environment({}, 29500)


# --------------------------------------------------------------------------- mpi environment


def test_mpi_environment_from_open_mpi_variables(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if mpi4py were not installed
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "MASTER_ADDR": "node-a", "MASTER_PORT": "6001"}
    assert launched_by_mpi(env)
    assert mpi_environment(env, 29500) == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node-a", "MASTER_PORT": "6001"}
    env = {"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}
    assert mpi_environment(env, 29500)["MASTER_ADDR"] == "127.0.0.1"


def test_mpi_environment_outside_mpirun():
    # started by DeepSpeed's own launcher: RANK/WORLD_SIZE are kept (no MPI singleton init)
    assert mpi_environment({"RANK": "1", "WORLD_SIZE": "2"}, 29500) == {}
    with pytest.raises(RuntimeError, match="start the ranks with mpirun"):
        mpi_environment({}, 29500)


# --------------------------------------------------------------------------- no ssh


def test_per_node_launch_without_ssh(two_nodes):
    p = plan(hostfile=two_nodes, no_ssh=True, node_rank=1)
    assert not p.multi_node_exec and p.node_rank == 1 and p.world_size == 4
    assert p.argv[p.argv.index("--no_ssh"):p.argv.index("--no_ssh") + 3] == [
        "--no_ssh", "--node_rank", "1"]
    assert opt(p.argv, "--master_addr") == "worker-0"
    assert backend_command(p) is None and "DS_ENV_FILE" not in p.env
    assert plan(hostfile=two_nodes, no_ssh=True, environ={"NODE_RANK": "0"}).node_rank == 0
    p = plan(hostfile=two_nodes, no_ssh=True, node_rank=0, master_addr="10.0.0.5")
    assert opt(p.argv, "--master_addr") == "10.0.0.5"


def test_per_node_launch_finds_its_host_name(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "gethostname", lambda: "trainer-1")
    monkeypatch.setattr(socket, "getfqdn", lambda: "trainer-1.trainers.default.svc")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("trainer-0.trainers slots=1\ntrainer-1.trainers slots=1\n")
    assert plan(hostfile=str(hostfile), no_ssh=True).node_rank == 1


def test_per_node_launch_errors(two_nodes):
    with pytest.raises(ConfigError, match="no_ssh: a per-node launch needs a hostfile"):
        plan(no_ssh=True, node_rank=0)
    with pytest.raises(ConfigError, match="node_rank: 2 is not in 0..1"):
        plan(hostfile=two_nodes, no_ssh=True, node_rank=2)
    with pytest.raises(ConfigError, match="pass --node_rank"):
        plan(hostfile=two_nodes, no_ssh=True)
    with pytest.raises(ConfigError, match="node_rank: only meaningful with --no_ssh"):
        plan(hostfile=two_nodes, node_rank=1)


# --------------------------------------------------------------------------- environment


def test_environment_forwarded_to_remote_ranks(two_nodes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".deepspeed_env").write_text("# comment\n\nNCCL_IB_HCA=mlx5_0\nexport FOO=bar baz\n")
    environ = {"TORCH_EXTENSIONS_DIR": "/cache/ext", "NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME":
               "eth1", "WANDB_API_KEY": "secret", "PYTHONPATH": "/x", "HOME": str(tmp_path)}
    p = plan(environ=environ, hostfile=two_nodes, master_addr="10.0.0.1")
    assert p.exports == {"TORCH_EXTENSIONS_DIR": "/cache/ext", "NCCL_DEBUG": "INFO",
                         "GLOO_SOCKET_IFNAME": "eth1", "NCCL_IB_HCA": "mlx5_0", "FOO": "bar baz"}
    assert "MASTER_ADDR" not in p.exports  # pdsh ranks get it from DeepSpeed's launch.py
    exported = runner_exports(p, environ)
    assert exported["PYTHONPATH"] == f"{tmp_path}:/x" and "WANDB_API_KEY" not in exported
    cmd = backend_command(p, environ)
    assert cmd[:2] == ["pdsh", "-S"]
    assert "export NCCL_DEBUG=INFO;" in cmd[cmd.index("-w") + 2]
    assert 'export FOO="bar baz";' in cmd[cmd.index("-w") + 2]


def test_user_env_file_named_by_ds_env_file(two_nodes, tmp_path):
    extra = tmp_path / "extra_env"
    extra.write_text("LAUNCH_TEST=1\n")
    p = plan(environ={"DS_ENV_FILE": str(extra), "HOME": str(tmp_path)}, hostfile=two_nodes,
             master_addr="10.0.0.1")
    assert p.exports == {"LAUNCH_TEST": "1"}
    assert p.env["DS_ENV_FILE"] != str(extra) and p.env["DS_ENV_FILE"] in p.files
    assert parse_env_file(p.files[p.env["DS_ENV_FILE"]]) == {"LAUNCH_TEST": "1"}


# --------------------------------------------------------------------------- failure reports


def test_failure_lines_are_recognized():
    guard = parse_failure("node-b: [rank-guard] rank 1 (pid 77 on node-b) was killed by SIGKILL "
                          "at 12:00:01")
    assert (guard.rank, guard.pid, guard.host, guard.how) == (1, 77, "node-b",
                                                              "was killed by SIGKILL")
    assert guard.describe() == "rank 1 (pid 77 on node-b) was killed by SIGKILL"
    stopped = parse_failure("[rank-guard] rank 0 (pid 76 on node-a) exited with status 1 at "
                            "12:00:02 (after SIGTERM)")
    assert stopped.after_stop and stopped.how == "exited with status 1"
    mpi = parse_failure("mpirun noticed that process rank 1 with PID 0 on node vm exited on "
                        "signal 9 (Killed).")
    assert (mpi.rank, mpi.host, mpi.pid) == (1, "vm", None)
    srun = parse_failure("srun: error: vm: task 1: Killed")
    assert (srun.rank, srun.host, srun.how) == (1, "vm", "Killed")
    assert parse_failure("srun: error: vm: task 0: Terminated") is None
    pdsh = parse_failure("pdsh@vm: node-b: ssh exited with exit code 137")
    assert pdsh.rank is None and pdsh.describe() == "node node-b: its launcher exited with " \
                                                    "status 137"
    assert parse_failure("pdsh@vm: node-b: ssh exited with exit code 0") is None
    assert parse_failure("iteration 3/3 | lr 1.0E-04") is None
    assert first_failure([pdsh, stopped, mpi, guard]) is guard
    assert first_failure([pdsh, stopped]) is stopped
    assert first_failure([]) is None


# --------------------------------------------------------------------------- the rank guard


def _guard(tmp_path, body, *args, env=None):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", RANK_GUARD, *args, str(script), "x"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_rank_guard_passes_success_and_arguments_through(tmp_path):
    out = _guard(tmp_path, "import sys; print(sys.argv[1:])", "--local_rank=3")
    assert out.returncode == 0 and out.stdout.strip() == "['--local_rank=3', 'x']"
    assert out.stderr == ""


def test_rank_guard_names_a_rank_that_dies(tmp_path):
    out = _guard(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
                 env={"RANK": "5"})
    assert out.returncode == 137
    failure = parse_failure(out.stderr)
    assert failure.rank == 5 and failure.how == "was killed by SIGKILL"
    out = _guard(tmp_path, "raise SystemExit(3)", env={"RANK": "", "OMPI_COMM_WORLD_RANK": "2"})
    assert out.returncode == 3 and parse_failure(out.stderr).rank == 2
    assert parse_failure(out.stderr).how == "exited with status 3"


def test_rank_guard_forwards_sigterm_and_dies_with_its_rank(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
                      "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", RANK_GUARD, str(script)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0  # the rank's own handler decided the status
    # a guard that is killed takes its rank with it (PR_SET_PDEATHSIG)
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", RANK_GUARD, str(script)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    rank = psutil.Process(proc.pid).children()[0]
    proc.kill()
    proc.wait(30)
    gone, _alive = psutil.wait_procs([rank], timeout=30)
    assert gone


def test_every_launch_path_starts_the_rank_guard_as_a_module(two_nodes, tmp_path):
    one_local = tmp_path / "one_local"
    one_local.write_text("localhost slots=2\n")
    guarded = ["-m", RANK_GUARD, "train.py", *ARGS]
    local = plan(num_gpus=2, rank_guard=True)  # DeepSpeed's local launcher
    assert local.argv[-5:] == ["--module", RANK_GUARD, "train.py", *ARGS]
    per_node = plan(hostfile=two_nodes, no_ssh=True, node_rank=0, rank_guard=True)
    assert per_node.argv[-5:] == ["--module", RANK_GUARD, "train.py", *ARGS]
    pdsh = backend_command(plan(hostfile=two_nodes, master_addr="10.0.0.1", rank_guard=True), {})
    assert "--module" in pdsh and pdsh[-4:] == [RANK_GUARD, "train.py", *ARGS]
    mpirun = backend_command(plan(hostfile=str(one_local), launcher="openmpi", force_multi=True,
                                  rank_guard=True), {})
    assert mpirun[-5:] == guarded
    slurm = plan(environ=SLURM_ALLOCATION, launcher="slurm", rank_guard=True)
    srun = backend_command(slurm, {})
    assert srun[0] == "srun" and srun[-6:] == ["-u", *guarded]
    assert not any(part.endswith("rank_guard.py") for part in srun + slurm.argv)


def test_rank_guard_module_loads_no_torch():
    code = "import sys, megatron.launch.rank_guard; print(sorted({'torch', 'deepspeed'} & " \
           "set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- deepy's supervisor

SUPERVISE = """
import sys
from megatron.launch.supervise import supervise
sys.exit(supervise({argv!r}, dict(__import__("os").environ), "train.py", grace=1,
                   kill_after=2))
"""


def _supervise(tmp_path, launcher_body, timeout=120):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(launcher_body))
    code = SUPERVISE.format(argv=[sys.executable, str(launcher)])
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    return out, time.monotonic() - started


def test_supervisor_stops_a_job_whose_launcher_does_not(tmp_path):
    # a "launcher" whose rank reported a death but which hangs instead of stopping the job
    out, took = _supervise(tmp_path, """
        import subprocess, sys, time
        print("[rank-guard] rank 1 (pid 4242 on node-b) was killed by SIGKILL at 12:00:00",
              file=sys.stderr, flush=True)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        time.sleep(300)
    """)
    assert out.returncode != 0
    assert "[rank-guard] rank 1" in out.stderr  # relayed
    assert "job is still running: stopping it" in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("deepy.py: error: rank 1 (pid 4242 on node-b) was killed by SIGKILL")
    assert took < 60


def test_supervisor_stops_processes_left_behind(tmp_path):
    marker = tmp_path / "orphan.pid"
    out, _took = _supervise(tmp_path, f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True)
        open({str(marker)!r}, "w").write(str(p.pid))
    """)
    assert out.returncode == 0, out.stderr
    assert "stopped 1 process(es) still running after the launcher exited" in out.stderr
    import psutil

    pid = int(marker.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_supervisor_reports_a_failed_launcher(tmp_path):
    out, _took = _supervise(tmp_path, "raise SystemExit(4)")
    assert out.returncode == 4
    assert out.stderr.strip().splitlines()[-1] == \
        "deepy.py: error: the launcher exited with status 4"


# --------------------------------------------------------------------------- deepy dry run


def test_dry_run_shows_the_multi_node_details(one_local, capsys, monkeypatch):
    from megatron.launch.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["--dry-run", "-H", one_local, "--launcher", "openmpi", "--force_multi",
                       "train.py", "configs/tiny_neox.yml", "--tokenizer_type",
                       "CharLevelTokenizer", "--data_path", "/nonexistent/data"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "note: deepspeed_mpi: true (ranks started by openmpi" in out
    assert "ranks started by: openmpi" in out
    assert "exported to the ranks: " in out and "MASTER_ADDR" in out
    assert re.search(r"generated at launch: \S+/deepspeed_env \(\d+ variables\)", out)
    command = out.strip().splitlines()[-1]
    assert f"{RANK_GUARD} train.py --neox_config " in command
    assert "--mca btl_tcp_if_include lo" in command
