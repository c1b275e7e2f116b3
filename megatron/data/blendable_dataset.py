"""Weighted blending of several datasets.

``BlendableDataset(datasets, weights, size=None)`` has ``size`` samples (default: the sum of the
datasets' lengths); sample ``i`` is the next unused sample of the dataset chosen by
:func:`megatron.data.helpers.build_blending_indices`, a deterministic low-discrepancy
interleaving in which every prefix of the blend holds each dataset in proportion to its
weight (within about one sample). Construction checks that no dataset is drawn more often
than it has samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.helpers import build_blending_indices


class BlendableDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int | None = None):
        if len(datasets) == 0:
            raise ValueError("BlendableDataset needs at least one dataset")
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.size = int(size) if size is not None else sum(len(d) for d in self.datasets)
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size
        )
        draws = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (ds, n) in enumerate(zip(self.datasets, draws)):
            if n > len(ds):
                name = getattr(ds, "name", f"#{k}")
                prefix = getattr(ds, "data_prefix", "")
                raise ValueError(
                    f"blended dataset {name} {prefix} has {len(ds)} samples but the blend of "
                    f"{self.size} samples draws {int(n)} from it (weight {self.weights[k]:.4f})"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size} samples")
        k = int(self.dataset_index[idx])
        return self.datasets[k][int(self.dataset_sample_index[idx])]
