"""Tests of megatron/launch: deepy.py's command line and dry runs, launch plans, the rank
guard and the supervisor, the installed package, and the real launchers (mpirun, pdsh over a
throwaway sshd, a throwaway Slurm, per-node launches).

The launcher tests are marked ``launchers`` (deepy.py's dry runs and the argv tests in
test_deepy.py and test_launcher.py are not: they run in ``make test-fast``; the install test is
``slow``). A test that needs system tools (Debian's openmpi-bin,
openssh-server + openssh-client + pdsh, slurmctld + slurmd + slurm-client) asks for them with
``launch_helpers.require_tools(...)``:

* where they are installed, it runs;
* in CI (``CI`` set to true/1/yes, as .ci/run does) a missing tool FAILS the test: .ci/run
  installs them, so their absence is a broken CI setup, never a silent skip;
* elsewhere the test is skipped, and the summary says which packages to install.

``pytest -m "not launchers"`` deselects the launcher tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch_helpers  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if launch_helpers.SKIPPED:
        terminalreporter.write_line(
            "tests/launch: launcher tests skipped because tools are missing "
            "(install them, or run .ci/run):", yellow=True)
        for message in sorted(launch_helpers.SKIPPED):
            terminalreporter.write_line(f"  {message}", yellow=True)
