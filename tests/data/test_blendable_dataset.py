from __future__ import annotations

import numpy as np
import pytest

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.helpers import build_blending_indices


@pytest.mark.parametrize(
    "weights", [[0.5, 0.3, 0.2], [0.7, 0.001, 0.299], [1, 1, 1, 1, 1, 1, 1], [2.0, 13.0]]
)
def test_blending_proportions_and_low_discrepancy(weights):
    size = 100_000
    index, sample = build_blending_indices(weights, size)
    w = np.asarray(weights, dtype=float) / sum(weights)
    assert len(index) == len(sample) == size
    counts = np.bincount(index, minlength=len(w))
    assert np.all(np.abs(counts / size - w) < 0.01)
    # every prefix stays close to its target (random sampling would drift by ~sqrt(n))
    onehot = np.zeros((size, len(w)))
    onehot[np.arange(size), index] = 1
    realized = np.cumsum(onehot, axis=0)
    target = np.arange(1, size + 1)[:, None] * w[None, :]
    assert np.max(np.abs(realized - target)) < 2.0
    # each dataset's samples are drawn in order 0, 1, 2, ...
    for k in range(len(w)):
        np.testing.assert_array_equal(sample[index == k], np.arange(counts[k]))


def test_blending_is_deterministic_and_handles_zero_weight():
    a = build_blending_indices([0.2, 0.0, 0.8], 5000)
    b = build_blending_indices([0.2, 0.0, 0.8], 5000)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert 1 not in set(a[0].tolist())
    with pytest.raises(ValueError, match="non-negative"):
        build_blending_indices([1.0, -1.0], 10)


class _Numbers:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.name, i)


def test_blendable_dataset_draws_each_sample_in_order():
    ds = BlendableDataset([_Numbers("a", 300), _Numbers("b", 800)], [1, 3], size=1000)
    items = [ds[i] for i in range(len(ds))]
    a = [i for name, i in items if name == "a"]
    b = [i for name, i in items if name == "b"]
    assert a == list(range(250)) and b == list(range(750))
    with pytest.raises(IndexError):
        ds[1000]


def test_blendable_dataset_too_small_is_an_error():
    with pytest.raises(
        ValueError,
        match="blended dataset small  has 100 samples but the blend of 1000 samples draws 500",
    ):
        BlendableDataset([_Numbers("small", 100), _Numbers("big", 1000)], [1, 1], size=1000)
