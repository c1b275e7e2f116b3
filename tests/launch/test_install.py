"""``pip install .`` (not editable) into a fresh virtual environment, then ``python deepy.py
train.py <tiny config>`` from a directory outside the source tree trains on 2 CPU ranks, with
the launcher, the rank guard and the ranks all importing ``megatron`` from the new environment.

The new environment reaches the test environment's third-party packages (torch, DeepSpeed, ...)
through one ``.pth`` line naming its site-packages, so nothing is downloaded or reinstalled; the
``.pth`` files inside that directory (among them the editable install of this project) are not
processed for a directory added that way. A ``sitecustomize`` in the new environment records, for
every Python process of the job, where ``import megatron`` found the package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from launch_helpers import build_corpus, free_master_port, write_job_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
IGNORED = (".git", ".venv", "build", "*.egg-info", "__pycache__", "data", "runs", ".pytest_cache")

# Written into the new environment only: logs the origin of every import of the top-level
# ``megatron`` package, with the process's command line, to $INSTALL_TEST_IMPORT_LOG.
RECORDER = '''
import json, os, sys


class _MegatronImportRecorder:
    def find_spec(self, name, path=None, target=None):
        if name != "megatron" or not os.environ.get("INSTALL_TEST_IMPORT_LOG"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                line = json.dumps({"pid": os.getpid(), "argv": sys.orig_argv,
                                   "origin": spec.origin})
                with open(os.environ["INSTALL_TEST_IMPORT_LOG"], "a") as log:
                    log.write(line + "\\n")
                return spec
        return None


sys.meta_path.insert(0, _MegatronImportRecorder())
'''


def copy_source(dest: Path) -> None:
    """The files of a clean checkout (tracked or new, not ignored), or the tree without build
    outputs, caches and data where git is not available."""
    listed = None
    if shutil.which("git") and (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True, timeout=60)
    if listed is None or listed.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*IGNORED))
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"$ {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def program_of(argv: list[str]) -> str:
    """What a Python command line runs: the module after -m, else the script's file name."""
    args = list(argv[1:])
    while args:
        part = args.pop(0)
        if part == "-m":
            return args[0] if args else ""
        if part == "-c":
            return part
        if part in ("-W", "-X"):
            args = args[1:]
        elif not part.startswith("-"):
            return os.path.basename(part)
    return ""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def test_installed_package_trains_from_outside_the_source_tree(tmp_path):
    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "work"
    copy_source(src)
    assert (src / "setup.py").is_file() and (src / "megatron" / "launch" / "rank_guard.py").is_file()

    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    python = str(venv / "bin" / "python")
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       env=clean_env(), timeout=120).stdout.strip())
    shared = sysconfig.get_paths()["purelib"]  # torch, DeepSpeed, ... of the test environment
    assert Path(shared).resolve() != purelib.resolve()
    (purelib / "shared_packages.pth").write_text(shared + "\n")
    (purelib / "sitecustomize.py").write_text(RECORDER)

    # not editable, no downloads: setuptools and the dependencies come from the shared packages;
    # --ignore-installed: pip leaves the shared environment's install of the project alone
    run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--ignore-installed", "--disable-pip-version-check", "-q", str(src)],
        cwd=tmp_path, env=clean_env(), timeout=600)
    installed = purelib / "megatron"
    assert (installed / "launch" / "rank_guard.py").is_file()
    assert (purelib / "deepy.py").is_file()
    assert not list(purelib.glob("__editable__*"))
    where = run([python, "-c", "import megatron, deepspeed; print(megatron.__file__)"],
                cwd=work.parent, env=clean_env(DS_ACCELERATOR="cpu"), timeout=300)
    assert Path(where.stdout.strip()).parent == installed

    work.mkdir()
    for script in ("deepy.py", "train.py"):
        shutil.copy2(src / script, work / script)
    shutil.copy2(src / "configs" / "tiny_neox.yml", work / "tiny_neox.yml")
    corpus = build_corpus(work / "data")
    job = write_job_config(work / "job.yml", corpus, log_dir=str(work / "logs"),
                           train_iters=4, num_gpus=2, master_port=int(free_master_port()))
    shutil.rmtree(src)  # nothing of the source tree is left to import from

    log = work / "imports.jsonl"
    proc = subprocess.run([python, "deepy.py", "train.py", "tiny_neox.yml", job], cwd=work,
                          capture_output=True, text=True, timeout=600,
                          env=clean_env(DS_ACCELERATOR="cpu", INSTALL_TEST_IMPORT_LOG=str(log)))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "iteration 4/4" in output, output[-6000:]
    metrics = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    losses = [r["lm_loss"] for r in metrics if r.get("type") == "train"]
    assert len(losses) == 4 and all(isinstance(x, float) and x > 0 for x in losses), metrics

    imports = [json.loads(line) for line in log.read_text().splitlines()]
    by_program: dict[str, list[str]] = {}
    for record in imports:
        by_program.setdefault(program_of(record["argv"]), []).append(record["origin"])
    assert len(by_program.get("deepy.py", [])) == 1, by_program
    assert len(by_program.get("megatron.launch.rank_guard", [])) == 2, by_program
    assert len(by_program.get("train.py", [])) == 2, by_program
    expected = str(installed / "__init__.py")
    assert {record["origin"] for record in imports} == {expected}, by_program
