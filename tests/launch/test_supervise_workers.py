"""The launcher's worker discovery finds the ranks, not their data-loader workers (forks with
the same command line), so a stop signal reaches only the processes that save."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from megatron.launch.supervise import _worker_processes

RANK = """
import multiprocessing as mp, sys, time
def idle():
    time.sleep(60)
if __name__ == "__main__":
    workers = [mp.get_context("fork").Process(target=idle) for _ in range(2)]
    for w in workers:
        w.start()
    print(" ".join(str(w.pid) for w in workers), flush=True)
    time.sleep(60)
"""


def test_discovery_skips_the_ranks_forked_workers(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RANK)
    rank = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE,
                            text=True)
    try:
        workers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(workers) == 2
        deadline = time.monotonic() + 30
        found = []
        while time.monotonic() < deadline:
            found = [p.pid for p in _worker_processes(os.getpid(), "train.py")]
            if rank.pid in found:
                break
            time.sleep(0.2)
        assert found == [rank.pid]
    finally:
        rank.kill()
        rank.wait()
        for pid in workers:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
