from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.samplers import MegatronPretrainingSampler, build_data_loader


def _run(total, consumed, mbs, dp, drop_last=True):
    """Global order of samples consumed by all DP ranks together, step by step."""
    per_rank = [
        list(MegatronPretrainingSampler(total, consumed, mbs, r, dp, drop_last)) for r in range(dp)
    ]
    steps = [len(p) for p in per_rank]
    assert len(set(steps)) == 1 or not drop_last
    order = []
    for step in range(max(steps)):
        for r in range(dp):
            if step < len(per_rank[r]):
                batch = per_rank[r][step]
                assert len(batch) == mbs or not drop_last
                order.extend(batch)
    return order, per_rank


def test_two_ranks_partition_each_global_batch():
    order, per_rank = _run(total=50, consumed=0, mbs=3, dp=2)
    assert order == list(range(48))  # 8 global batches of 6, the partial tail dropped
    assert per_rank[0][0] == [0, 1, 2] and per_rank[1][0] == [3, 4, 5]
    assert len(MegatronPretrainingSampler(50, 0, 3, 0, 2)) == 8


@pytest.mark.parametrize("consumed", [6, 18, 30, 42])
def test_resume_from_consumed_samples_without_replay_or_skip(consumed):
    full, _ = _run(total=50, consumed=0, mbs=3, dp=2)
    seen = full[: full.index(consumed)]
    resumed, _ = _run(total=50, consumed=consumed, mbs=3, dp=2)
    assert seen + resumed == full
    assert not set(seen) & set(resumed)


def test_keep_last_partial_batch():
    order, per_rank = _run(total=50, consumed=0, mbs=3, dp=2, drop_last=False)
    assert sorted(order) == list(range(50))
    assert per_rank[0][-1] == [48, 49] and len(per_rank[1]) == 8


def test_invalid_arguments():
    with pytest.raises(ValueError, match="consumed_samples 50 is outside"):
        MegatronPretrainingSampler(50, 50, 2, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        MegatronPretrainingSampler(50, 0, 2, 2, 2)


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"text": np.full(9, i, dtype=np.uint16), "label": np.full(9, -i, dtype=np.int32)}


def test_data_loader_batches_for_one_rank():
    loader = build_data_loader(
        _Toy(), consumed_samples=8, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=0
    )
    batches = list(loader)
    assert len(batches) == 8
    first = batches[0]
    assert first["text"].dtype == torch.int64 and first["text"].shape == (2, 9)
    assert first["text"][:, 0].tolist() == [10, 11] and first["label"][:, 0].tolist() == [-10, -11]
    assert batches[1]["text"][:, 0].tolist() == [14, 15]
    assert build_data_loader(None, 0, 2, 0, 1) is None


def test_loader_workers_survive_a_stop_signal_sent_to_the_whole_group():
    """SIGTERM to every process of a rank (Slurm preemption signals the process group) leaves
    its loader workers running: the rank saves at the next step and shuts them down itself."""
    import os
    import signal

    loader = build_data_loader(
        _Toy(), consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=1, num_workers=2
    )
    it = iter(loader)
    seen = [next(it)["text"][:, 0].tolist()]
    workers = [w.pid for w in it._workers]
    assert len(workers) == 2

    def ignoring(pid: int) -> bool:  # the worker ran its init function (SIGTERM ignored)
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
        return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))

    import time

    deadline = time.time() + 30
    while not all(ignoring(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.01)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    seen += [b["text"][:, 0].tolist() for b in it]
    assert seen == [[2 * i, 2 * i + 1] for i in range(len(_Toy()) // 2)]
