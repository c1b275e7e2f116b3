"""Unpacked and pairwise datasets: one document per sample, for post-training.

``UnpackedDataset`` serves each document of a set of aligned indexed datasets as one sample
of ``seq_length + 1`` tokens (cut, or padded: tokens with 0, labels with -100), in a seeded
order that is reshuffled every epoch. Its parts are named by the keys of the sample they
fill:

- ``text`` (and ``label``): a document and its labels (the labels default to the tokens);
- ``neg_text`` / ``neg_label``: the rejected side of a preference pair, aligned with
  ``text``/``label`` (``dataset_impl: pairwise``);
- ``reward``: one value per document (KTO: > 0 desirable);
- ``ref_logp`` / ``neg_ref_logp``: precomputed reference log-probabilities, one value per
  document (``precompute_model_name``).

With ``allow_chopped: false`` documents longer than a sample are left out instead of cut.
``build_post_training_datasets`` builds the three splits from the config sections.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.data_utils import SPLIT_NAMES, normalized_weights_and_num_samples
from megatron.data.indexed_dataset import MMapIndexedDataset, make_dataset

IGNORE = -100
SCALAR_PARTS = ("reward", "ref_logp", "neg_ref_logp")


class UnpackedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples, one document each, from aligned indexed datasets."""

    def __init__(self, name: str, parts: dict[str, MMapIndexedDataset], num_samples: int,
                 seq_length: int, seed: int, *, allow_chopped: bool = True):
        if "text" not in parts:
            raise ValueError(f"{name} dataset: no text dataset")
        self.name, self.parts, self.seq_length = name, parts, int(seq_length)
        text = parts["text"]
        n = len(text)
        for key, ds in parts.items():
            if len(ds) != n:
                raise ValueError(f"{name} {key} dataset {ds.path_prefix} has {len(ds)} "
                                 f"documents, {text.path_prefix} has {n}")
        for key, other in (("label", "text"), ("neg_label", "neg_text")):
            if key in parts and other in parts and \
                    not np.array_equal(parts[key].sizes, parts[other].sizes):
                raise ValueError(f"{name} {key} dataset {parts[key].path_prefix} is not "
                                 f"aligned with {parts[other].path_prefix}")
        docs = np.arange(n, dtype=np.int64)
        if not allow_chopped:
            fits = text.sizes <= self.seq_length + 1
            if "neg_text" in parts:
                fits &= parts["neg_text"].sizes <= self.seq_length + 1
            docs = docs[fits]
        if len(docs) == 0:
            raise ValueError(f"{name} dataset {text.path_prefix}: no document fits "
                             f"seq_length {self.seq_length} + 1 (allow_chopped is false)")
        epochs = max(1, -(-int(num_samples) // len(docs)))
        rng = np.random.RandomState(seed)
        self.order = np.concatenate([rng.permutation(docs) for _ in range(epochs)])
        self.order = self.order[:max(int(num_samples), 1)]

    def __len__(self) -> int:
        return len(self.order)

    def _fit(self, values: np.ndarray, pad: int) -> np.ndarray:
        out = np.full(self.seq_length + 1, pad, dtype=np.int64)
        values = values[:self.seq_length + 1]
        out[:len(values)] = values
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        doc = int(self.order[idx])
        out: dict[str, np.ndarray] = {}
        for side in ("", "neg_"):
            if f"{side}text" not in self.parts:
                continue
            tokens = np.asarray(self.parts[f"{side}text"][doc], dtype=np.int64)
            labels = np.asarray(self.parts[f"{side}label"][doc], dtype=np.int64) \
                if f"{side}label" in self.parts else tokens
            out[f"{side}text"] = self._fit(tokens, 0)
            out[f"{side}label"] = self._fit(labels, IGNORE)
        for key in SCALAR_PARTS:
            if key in self.parts:
                out[key] = np.asarray(self.parts[key][doc][:1], dtype=np.float32)
        return out


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    return [os.fspath(value)] if isinstance(value, (str, os.PathLike)) else list(value)


def _split_parts(split: str, data: Any, post: Any) -> list[dict[str, str]]:
    """For each dataset of ``split``: the prefix of every part."""
    pairwise = data.dataset_impl == "pairwise"
    if pairwise:
        named = {"text": f"pos_{split}_data_paths", "label": f"pos_{split}_label_data_paths",
                 "neg_text": f"neg_{split}_data_paths",
                 "neg_label": f"neg_{split}_label_data_paths"}
        source = {k: _list(getattr(post, v)) for k, v in named.items()}
    else:
        source = {"text": _list(getattr(data, f"{split}_data_paths")),
                  "label": _list(getattr(data, f"{split}_label_data_paths")),
                  "reward": _list(getattr(post, f"{split}_reward_data_paths"))}
    out: list[dict[str, str]] = []
    for i, text in enumerate(source["text"]):
        parts = {k: v[i] for k, v in source.items() if v}
        if post.precompute_model_name:
            parts["ref_logp"] = f"{text}_{post.precompute_model_name}_ref"
            if "neg_text" in parts:
                parts["neg_ref_logp"] = f"{parts['neg_text']}_{post.precompute_model_name}_ref"
        out.append(parts)
    return out


def build_post_training_datasets(data: Any, post: Any, *, seq_length: int, seed: int,
                                 train_val_test_num_samples: Sequence[int]
                                 ) -> tuple[Any, Any, Any]:
    """``(train, valid, test)`` unpacked datasets for the ``data`` and ``posttrain``
    sections (None where a split has no data or no samples); several datasets of a split
    are blended by ``*_data_weights`` (equal by default)."""
    splits: list[Any] = []
    for i, split in enumerate(SPLIT_NAMES):
        n = int(train_val_test_num_samples[i])
        per_dataset = _split_parts(split, data, post)
        if not per_dataset or n <= 0:
            splits.append(None)
            continue
        weights = getattr(data, f"{split}_data_weights") or [1.0] * len(per_dataset)
        if len(weights) != len(per_dataset):
            weights = [1.0] * len(per_dataset)
        norm, counts = normalized_weights_and_num_samples(weights, n)
        sets = []
        for parts, count in zip(per_dataset, counts):
            opened = {k: make_dataset(p, data.data_impl, not data.mmap_warmup)
                      for k, p in parts.items()}
            sets.append(UnpackedDataset(split, opened, count, seq_length, seed + i,
                                        allow_chopped=data.allow_chopped))
        splits.append(sets[0] if len(sets) == 1 else BlendableDataset(sets, norm, size=n))
    return splits[0], splits[1], splits[2]
