"""Running tiny trainings through deepy.py on the real launchers, and killing one of their ranks.

Every job gets a unique ``LAUNCH_TEST_MARK`` in its environment. Local launchers pass it on to
the ranks by inheritance; for ranks started over ssh it travels in a ``.deepspeed_env`` file
(``DS_ENV_FILE``), so finding a rank by its mark also proves the forwarding works. The mark is
how the tests find the ranks of *their* job on a machine shared with other test runs, and how
they check that nothing of a job survives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from local_cluster import free_port, missing

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = {  # tool -> Debian package
    "mpirun": "openmpi-bin", "ompi_info": "openmpi-bin",
    "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
    "pdsh": "pdsh",
    "slurmctld": "slurmctld", "slurmd": "slurmd", "srun": "slurm-client",
    "salloc": "slurm-client", "sinfo": "slurm-client",
}  # fmt: skip
SKIPPED: set[str] = set()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_tools(*tools: str, root: bool = False) -> None:
    """Fail (CI) or skip (elsewhere) unless the tools are installed (and we are root)."""
    absent = missing(tools)
    problems = []
    if absent:
        packages = sorted({PACKAGES.get(t, t) for t in absent})
        problems.append(f"needs {', '.join(absent)} (apt-get install {' '.join(packages)})")
    if root and os.geteuid() != 0:
        problems.append("needs root (a throwaway sshd / slurmd)")
    if not problems:
        return
    message = "; ".join(problems)
    if in_ci():
        pytest.fail(f"CI must provide the launcher tools (.ci/run installs them): {message}",
                    pytrace=False)
    SKIPPED.add(message)
    pytest.skip(message)


START_TIMEOUT = 420  # deepy.py -> runner -> ranks -> first iterations; the first run on a clean
# machine also compiles DeepSpeed's shm op (minutes on a slow shared machine)
JOB_TIMEOUT = 540
DEATH_LIMIT = 60  # a killed rank must end the job within this many seconds
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMI_RANK")


def build_corpus(directory: Path) -> str:
    """Random character-level token documents; returns the data prefix."""
    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "tiny_text_document"
    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for _ in range(64):
        builder.add_item(rng.integers(1, 256, size=256))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def write_job_config(path: Path, corpus: str, **values) -> str:
    cfg = {
        "data_path": corpus, "tokenizer_type": "CharLevelTokenizer", "split": "100,0,0",
        "train_iters": 3, "log_interval": 1, "eval_interval": 100000, "eval_iters": 1,
        "do_test": False, "num_workers": 0, "steps_per_print": 100000,
        "checkpoint_validation_with_forward_pass": False,
    }
    cfg.update(values)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class Job:
    """``python deepy.py ...`` in its own session, output in a log file."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str] | None = None,
                 mark: str | None = None, prefix: list[str] | None = None) -> None:
        self.mark = mark or uuid.uuid4().hex
        self.log = log
        full_env = dict(os.environ if env is None else env)
        full_env["LAUNCH_TEST_MARK"] = self.mark
        full_env["DS_ACCELERATOR"] = "cpu"  # CPU ranks with gloo, also on a machine with GPUs
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.cmd = [*(prefix or []), sys.executable, "deepy.py", *args]
        self._out = open(log, "w")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=full_env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job did not finish within {timeout} s:\n{self.tail()}") \
                from None
        finally:
            self._out.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        kill_marked(self.mark)

    def tail(self, n: int = 6000) -> str:
        return f"$ {' '.join(self.cmd[:6])} ...\n" + self.output()[-n:]


def free_master_port() -> str:
    return str(free_port("127.0.0.1"))


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("LAUNCH_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def job_processes(mark: str) -> list[psutil.Process]:
    """Every live process that belongs to the job (deepy, runner, launchers, guards, ranks)."""
    alive = []
    for proc in _marked(mark):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def is_rank(proc: psutil.Process, script: str = "train.py") -> bool:
    """``python -u train.py ...``: a rank itself (not its guard, launcher, mpirun or srun)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    if not cmdline or not os.path.basename(cmdline[0]).startswith("python"):
        return False
    args = [a for a in cmdline[1:] if not a.startswith("-")]
    return bool(args) and os.path.basename(args[0]) == script


def rank_of(proc: psutil.Process) -> int | None:
    try:
        env = proc.environ()
    except psutil.Error:
        return None
    for name in RANK_VARIABLES:
        if env.get(name, "").isdigit():
            return int(env[name])
    return None


def ranks(mark: str) -> dict[int, psutil.Process]:
    return {rank_of(p): p for p in job_processes(mark) if is_rank(p)}


def kill_marked(mark: str) -> None:
    for proc in job_processes(mark):
        try:
            proc.kill()
        except psutil.Error:
            pass


def wait_for(predicate, timeout: float, what: str, jobs: list[Job] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for job in jobs:
            if job.proc.poll() is not None:
                raise AssertionError(f"job exited ({job.proc.returncode}) while waiting for "
                                     f"{what}:\n{job.tail()}")
        time.sleep(0.3)
    raise AssertionError(f"timed out ({timeout} s) waiting for {what}:\n"
                         + "\n".join(job.tail(3000) for job in jobs))


def assert_trained(job: Job, code: int, iterations: int = 3, nodes: int = 1) -> None:
    out = job.output()
    assert code == 0, job.tail()
    assert out.count(f"iteration {iterations}/{iterations}") >= 1, job.tail()
    assert "[rank-guard]" not in out, job.tail()
    assert not job_processes(job.mark), "processes of the job outlived it"


def kill_rank_mid_training(jobs: list[Job], mark: str, rank: int) -> float:
    """Wait until the job trains (iteration 2 logged) and all its ranks run, SIGKILL ``rank``;
    returns the time of the kill."""
    wait_for(lambda: any("iteration 2/" in j.output() for j in jobs), START_TIMEOUT,
             "two training iterations", jobs)
    wait_for(lambda: rank in ranks(mark), 30, f"rank {rank} among the job's processes", jobs)
    victim = ranks(mark)[rank]
    victim.send_signal(signal.SIGKILL)
    return time.monotonic()


def assert_job_died(job: Job, killed_at: float, rank: int, *, names_rank: bool = True) -> str:
    """The job exits non-zero within DEATH_LIMIT seconds of the kill, its last error line
    names the rank, and none of its processes survive."""
    remaining = DEATH_LIMIT - (time.monotonic() - killed_at)
    try:
        code = job.proc.wait(max(remaining, 1))
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(f"the job was still running {DEATH_LIMIT} s after rank {rank} "
                             f"was killed:\n{job.tail()}") from None
    out = job.output()
    assert code != 0, f"exit status 0 after rank {rank} was killed:\n{job.tail()}"
    errors = [line for line in out.splitlines() if line.startswith("deepy.py: error:")]
    assert errors, f"no 'deepy.py: error:' line:\n{job.tail()}"
    if names_rank:
        assert f"rank {rank} " in errors[-1] and "SIGKILL" in errors[-1], errors[-1]
    deadline = time.monotonic() + 15
    while job_processes(job.mark) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = job_processes(job.mark)
    desc = []
    for p in left:
        try:
            desc.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    assert not left, "processes survived the job:\n" + "\n".join(desc)
    return errors[-1]
