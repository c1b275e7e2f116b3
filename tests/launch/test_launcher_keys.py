"""Launcher keys without a launch: the ones refused at validation (detect_nvlink_pairs,
autotuning_run, the autotuning block) and num_cpu_threads_per_rank on a CPU rank."""

from __future__ import annotations

import pytest
import torch

from megatron.neox_arguments import ConfigError
from tests.config.cfg_helpers import make_cfg


@pytest.mark.parametrize("name, value, words", [
    ("detect_nvlink_pairs", True, "DeeperSpeed's runner"),
    ("autotuning_run", "tune", "autotuner is not supported"),
    ("autotuning", {"enabled": True, "fast": True}, "autotuner is not supported"),
])  # fmt: skip
def test_refused_launcher_keys_fail_at_validation(name, value, words):
    with pytest.raises(ConfigError) as err:
        make_cfg(**{name: value})
    message = str(err.value)
    assert message.startswith(f"a.yml: {name}") and words in message
    assert "\n" not in message
    make_cfg(**{name: None})  # the default stays accepted


def test_num_cpu_threads_per_rank_sets_torch_threads(monkeypatch):
    from megatron.runtime.distributed import set_cpu_threads

    before = torch.get_num_threads()
    try:
        set_cpu_threads(make_cfg(num_cpu_threads_per_rank=1))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        set_cpu_threads(make_cfg())  # unset: the node's cores over its ranks
        assert torch.get_num_threads() == max(1, torch.multiprocessing.cpu_count())
    finally:
        torch.set_num_threads(before)


def test_comment_and_account_outside_slurm_are_noted(tmp_path):
    """GPT-NeoX passes comment (and account) to srun only: with another launcher the plan says
    that they are unused instead of dropping them silently."""
    from megatron.launch.plan import plan_launch
    from megatron.neox_arguments.groups_deepspeed import LauncherArgs

    def notes(**kw):
        return plan_launch(LauncherArgs(**kw), "train.py", [], gpu=False, local_device_count=0,
                           environ={"HOME": "/nonexistent"}).notes

    unused = "comment/account: only srun takes them (launcher: slurm); unused here"
    assert unused in notes(comment="run-7") and unused in notes(account="proj")
    assert unused not in notes(comment="run-7", launcher="slurm") and unused not in notes()
