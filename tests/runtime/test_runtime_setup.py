"""Start-up hygiene of a worker: DeepSpeed's unused shared-memory op and stale JIT-build locks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from megatron.runtime.distributed import SHM_COMM_OP, clear_stale_build_locks


def test_stale_build_locks_are_removed_and_fresh_ones_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "cpu_adam" / "lock"
    nested = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "fused_adam" / "lock"
    for lock in (stale, nested, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(nested, (old, old))
    (tmp_path / "cpu_adam" / "cpu_adam.so").touch()

    removed = clear_stale_build_locks(max_age_s=600)

    assert sorted(removed) == sorted([stale, nested])
    assert not stale.exists() and not nested.exists()
    assert fresh.exists() and (tmp_path / "cpu_adam" / "cpu_adam.so").exists()
    err = capsys.readouterr().err
    assert f"stale JIT-build lock {stale}" in err and str(fresh) not in err


def test_deepspeed_backend_skips_the_shared_memory_op(tmp_path):
    """After prepare_deepspeed_comm, DeepSpeed's torch backend builds no shm op (no JIT
    compile, no /dev/shm segment); without it, it does build the op."""
    probe = (
        "import sys, deepspeed.comm.torch as t\n"
        "from megatron.runtime.distributed import prepare_deepspeed_comm\n"
        "if sys.argv[1] == 'prepared': prepare_deepspeed_comm()\n"
        "import deepspeed.ops\n"
        f"print('compatible', deepspeed.ops.__compatible_ops__['{SHM_COMM_OP}'])\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    out = {}
    for mode in ("prepared", "plain"):
        proc = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = proc.stdout.split("compatible")[-1].strip()
    assert out == {"prepared": "False", "plain": "True"}


def test_run_main_tears_the_process_group_down_before_exit(tmp_path):
    """A worker's process group is destroyed by run_main (not left to interpreter exit, where
    gloo threads can abort the rank), for a successful main and for a failing one."""
    probe = (
        "import sys, torch.distributed as dist\n"
        "from megatron.runtime import run_main\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0,"
        " world_size=1)\n"
        "import atexit\n"
        "atexit.register(lambda: print('initialized at exit', dist.is_initialized()))\n"
        "run_main(lambda: int(sys.argv[1]))\n"
    )
    for code in (0, 3):
        proc = subprocess.run([sys.executable, "-c", probe, str(code)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert "initialized at exit False" in proc.stdout
