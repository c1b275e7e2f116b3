"""CI must run the launcher tests, not skip them: .ci/run installs the system tools they need."""

from __future__ import annotations

import os

import pytest
from launch_helpers import PACKAGES, in_ci
from local_cluster import MPI_TOOLS, SLURM_TOOLS, SSH_TOOLS, missing

pytestmark = pytest.mark.launchers


def test_ci_provides_every_launcher_tool():
    if not in_ci():
        pytest.skip("checked in CI only (CI=true); locally, missing tools skip their tests")
    absent = missing(MPI_TOOLS + SSH_TOOLS + SLURM_TOOLS)
    packages = sorted({PACKAGES.get(t, t) for t in absent})
    assert not absent, (f"CI lacks {', '.join(absent)}: .ci/run must apt-get install "
                        f"{' '.join(packages)}")
    assert os.geteuid() == 0, "the sshd and Slurm tests need root in CI"
