"""Damaged index caches and token ids the model cannot embed: one error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gpt2_dataset import make_corpus, make_dataset

from megatron.data.gpt2_dataset import DataError, check_token_ids
from megatron.runtime.startup import _one_line


@pytest.fixture()
def built(tmp_path):
    prefix = tmp_path / "corpus"
    make_corpus(prefix)
    ds = make_dataset(prefix, num_samples=50, seq_length=16, seed=1)
    assert ds.index_built
    return prefix, ds.index_files


def _reopen(prefix):
    return make_dataset(prefix, num_samples=50, seq_length=16, seed=1)


def test_an_intact_cache_is_reused(built):
    prefix, _files = built
    assert not _reopen(prefix).index_built


@pytest.mark.parametrize("kind,damage", [
    ("sample", "zeroed"), ("sample", "truncated"), ("shuffle", "out_of_range"),
    ("doc", "garbage"), ("shuffle", "wrong_length"), ("sample", "swapped_rows"),
])
def test_a_damaged_cache_is_one_error_naming_the_file(built, kind, damage):
    prefix, files = built
    path = files[kind]
    arr = np.load(path)
    if damage == "zeroed":
        np.save(path, np.zeros_like(arr))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "out_of_range":
        arr[3] = len(arr) + 7
        np.save(path, arr)
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 200)
    elif damage == "wrong_length":
        np.save(path, arr[:-1])
    else:
        arr[[2, 3]] = arr[[3, 2]]
        np.save(path, arr)
    with pytest.raises(DataError) as info:
        _reopen(prefix)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged index cache"), message
    assert "\n" not in message and "delete it to rebuild" in message


def test_token_ids_beyond_the_vocabulary_name_the_file_also_from_a_loader_worker(tmp_path):
    prefix = tmp_path / "corpus"
    make_corpus(prefix)  # ids up to 999
    ds = make_dataset(prefix, num_samples=20, seq_length=16, seed=1)
    check_token_ids(ds, 2000)
    _ = [ds[i] for i in range(len(ds))]  # all fine under a vocabulary of 2000
    check_token_ids(ds, 512)
    with pytest.raises(DataError, match=r"corpus\.bin: token id \d+ in document"):
        _ = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    line = _one_line(info.value)
    assert line.startswith(f"{prefix}.bin: token id "), line
    assert "outside the model's vocabulary of 512" in line and "\n" not in line
