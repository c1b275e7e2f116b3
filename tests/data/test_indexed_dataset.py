from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    make_dataset,
)

# The dtype codes as the format description lists them (Megatron-LM numbering).
FORMAT_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


def _random_items(dtype, rng, n=7):
    lengths = [0, 1, 5, 17, 0, 300, 2][:n]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return [
            rng.integers(info.min, info.max, size=k, endpoint=True).astype(dtype) for k in lengths
        ]
    return [rng.standard_normal(k).astype(dtype) for k in lengths]


def _build(prefix, items, dtype, doc_breaks):
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, item in enumerate(items):
        builder.add_item(item)
        if i in doc_breaks:
            builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", list(FORMAT_CODES), ids=lambda d: np.dtype(d).name)
def test_roundtrip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    items = _random_items(dtype, rng)
    prefix = tmp_path / "ds"
    _build(prefix, items, dtype, doc_breaks={1, 4, 6})
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(items)
    assert ds.sizes.tolist() == [len(x) for x in items]
    assert ds.doc_idx.tolist() == [0, 2, 5, 7]
    assert ds.num_tokens == sum(len(x) for x in items)
    for i, item in enumerate(items):
        np.testing.assert_array_equal(ds[i], item)
        assert ds[i].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[-2], items[-2])
    for got, want in zip(ds[1:6], items[1:6]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(ds[::3], items[::3]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.get(5, offset=10, length=20), items[5][10:30])
    np.testing.assert_array_equal(ds.get(5, offset=290), items[5][290:])
    np.testing.assert_array_equal(ds.get_document(1), np.concatenate(items[2:5]))
    with pytest.raises(IndexError):
        ds[len(items)]
    with pytest.raises(IndexError):
        ds.get(3, offset=10, length=10)


def test_add_item_accepts_tensors_and_lists(tmp_path):
    prefix = tmp_path / "ds"
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    builder.add_item(torch.tensor([1, 2, 65535]))
    builder.add_item([7, 8])
    builder.end_document()
    builder.finalize(f"{prefix}.idx")
    ds = MMapIndexedDataset(prefix)
    assert [x.tolist() for x in ds[0:2]] == [[1, 2, 65535], [7, 8]]


def test_add_item_rejects_values_outside_the_dtype(tmp_path):
    builder = MMapIndexedDatasetBuilder(tmp_path / "x.bin", dtype=np.uint16)
    with pytest.raises(ValueError, match="70000 does not fit in dtype uint16"):
        builder.add_item(np.array([1, 70000]))
    with pytest.raises(ValueError, match="-1 does not fit"):
        builder.add_item([-1])
    builder.discard()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_idx_layout_field_by_field(tmp_path, dtype):
    items = [np.arange(3), np.arange(5) + 10, np.arange(0), np.arange(4) + 100]
    items = [x.astype(dtype) for x in items]
    prefix = tmp_path / "ds"
    _build(prefix, items, dtype, doc_breaks={1, 3})

    itemsize = np.dtype(dtype).itemsize
    sizes = [len(x) for x in items]
    pointers = [0]
    for n in sizes[:-1]:
        pointers.append(pointers[-1] + n * itemsize)
    doc_idx = [0, 2, 4]
    expected = b"MMIDIDX\x00\x00"
    expected += struct.pack("<Q", 1)
    expected += struct.pack("<B", FORMAT_CODES[dtype])
    expected += struct.pack("<Q", len(sizes))
    expected += struct.pack("<Q", len(doc_idx))
    expected += struct.pack(f"<{len(sizes)}i", *sizes)
    expected += struct.pack(f"<{len(pointers)}q", *pointers)
    expected += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    assert (tmp_path / "ds.idx").read_bytes() == expected
    assert (tmp_path / "ds.bin").read_bytes() == b"".join(
        x.astype(f"<{np.dtype(dtype).str[1:]}").tobytes() for x in items
    )


def test_merge_file(tmp_path):
    rng = np.random.default_rng(1)
    a = [rng.integers(0, 1000, size=k).astype(np.uint16) for k in (3, 4, 5)]
    b = [rng.integers(0, 1000, size=k).astype(np.uint16) for k in (6, 1)]
    _build(tmp_path / "a", a, np.uint16, doc_breaks={0, 2})
    _build(tmp_path / "b", b, np.uint16, doc_breaks={1})
    builder = MMapIndexedDatasetBuilder(tmp_path / "m.bin", dtype=np.uint16)
    builder.add_item(np.array([9, 9], dtype=np.uint16))
    builder.end_document()
    builder.merge_file_(tmp_path / "a")
    builder.merge_file_(tmp_path / "b")
    builder.finalize(tmp_path / "m.idx")
    merged = MMapIndexedDataset(tmp_path / "m")
    expected = [np.array([9, 9])] + a + b
    assert len(merged) == len(expected)
    for got, want in zip(merged[0 : len(merged)], expected):
        np.testing.assert_array_equal(got, want)
    # own document, then a's documents [0,1),[1,3) shifted by 1, then b's [0,2) shifted by 4
    assert merged.doc_idx.tolist() == [0, 1, 2, 4, 6]
    # The merged bytes equal a single build of the same items and documents.
    _build(tmp_path / "direct", expected, np.uint16, doc_breaks={0, 1, 3, 5})
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "direct.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()


def test_merge_file_rejects_other_dtype(tmp_path):
    _build(tmp_path / "a", [np.arange(3, dtype=np.int32)], np.int32, doc_breaks={0})
    builder = MMapIndexedDatasetBuilder(tmp_path / "m.bin", dtype=np.uint16)
    with pytest.raises(ValueError, match=r"cannot merge .*a: its dtype int32 differs from uint16"):
        builder.merge_file_(tmp_path / "a")
    builder.discard()


def _valid_pair(tmp_path):
    items = [np.arange(10, dtype=np.uint16), np.arange(7, dtype=np.uint16)]
    _build(tmp_path / "ds", items, np.uint16, doc_breaks={0, 1})
    return tmp_path / "ds.idx", tmp_path / "ds.bin"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "bad magic": (lambda idx, bin_: _patch(idx, 0, b"XXXXXXX"), "idx", "bad magic"),
    "bad version": (
        lambda idx, bin_: _patch(idx, 9, struct.pack("<Q", 2)),
        "idx",
        "unsupported version 2",
    ),
    "unknown dtype": (lambda idx, bin_: _patch(idx, 17, b"\x09"), "idx", "unknown dtype code 9"),
    "truncated idx": (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-5]), "idx", "truncated"),
    "tiny idx": (lambda idx, bin_: idx.write_bytes(b"MMID"), "idx", "truncated"),
    "truncated bin": (
        lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]),
        "bin",
        "truncated or mismatched",
    ),
    "longer bin": (
        lambda idx, bin_: bin_.write_bytes(bin_.read_bytes() + b"\0\0"),
        "bin",
        "truncated or mismatched",
    ),
    # first pointer moved past the end of .bin (the last sequence stays consistent)
    "pointer past end": (
        lambda idx, bin_: _patch(idx, 34 + 2 * 4, struct.pack("<q", 10_000)),
        "idx",
        "lies outside",
    ),
    "doc_idx out of range": (
        lambda idx, bin_: _patch(idx, 34 + 2 * 4 + 2 * 8 + 8, struct.pack("<q", 99)),
        "idx",
        "doc_idx",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_raise_clear_errors(tmp_path, case):
    idx, bin_ = _valid_pair(tmp_path)
    MMapIndexedDataset(tmp_path / "ds")  # valid before the damage
    damage, named, message = CORRUPTIONS[case]
    damage(idx, bin_)
    with pytest.raises(IndexedDatasetError) as err:
        MMapIndexedDataset(tmp_path / "ds")
    text = str(err.value)
    assert message in text
    assert str(idx if named == "idx" else bin_) in text
    assert "\n" not in text


def test_pointer_damage_found_by_access_check_without_full_validation(tmp_path):
    idx, _ = _valid_pair(tmp_path)
    _patch(idx, 34 + 2 * 4, struct.pack("<q", 10_000))
    ds = MMapIndexedDataset(tmp_path / "ds", validate=False)
    np.testing.assert_array_equal(ds[1], np.arange(7))  # the last sequence is intact
    with pytest.raises(IndexedDatasetError, match="outside"):
        ds[0]


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"index file .*nope\.idx does not exist"):
        MMapIndexedDataset(tmp_path / "nope")
    _valid_pair(tmp_path)
    os.remove(tmp_path / "ds.bin")
    assert not MMapIndexedDataset.exists(tmp_path / "ds")
    with pytest.raises(IndexedDatasetError, match=r"data file .*ds\.bin does not exist"):
        MMapIndexedDataset(tmp_path / "ds")


def test_unfinished_builder_leaves_nothing_that_looks_complete(tmp_path):
    builder = MMapIndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16)
    builder.add_item([1, 2, 3])
    builder.end_document()
    assert not (tmp_path / "ds.bin").exists() and not (tmp_path / "ds.idx").exists()
    builder.discard()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(RuntimeError, match="boom"):
        with MMapIndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16) as b:
            b.add_item([1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_old_pair(tmp_path):
    _build(tmp_path / "ds", [np.arange(4)], np.uint16, doc_breaks={0})
    builder = MMapIndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16)
    builder.add_item(np.arange(9))
    builder.end_document()
    # until finalize the old, complete pair is untouched
    assert MMapIndexedDataset(tmp_path / "ds").sizes.tolist() == [4]
    builder.finalize(tmp_path / "ds.idx")
    assert MMapIndexedDataset(tmp_path / "ds").sizes.tolist() == [9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_empty_dataset(tmp_path):
    builder = MMapIndexedDatasetBuilder(tmp_path / "e.bin", dtype=np.uint16)
    builder.finalize(tmp_path / "e.idx")
    ds = MMapIndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.doc_idx.tolist() == [0] and ds.num_documents == 0


def test_reader_pickles_by_path(tmp_path):
    _build(tmp_path / "ds", [np.arange(1000)], np.int32, doc_breaks={0})
    ds = MMapIndexedDataset(tmp_path / "ds")
    blob = pickle.dumps(ds)
    assert len(blob) < 500  # the path, not the data
    np.testing.assert_array_equal(pickle.loads(blob)[0], np.arange(1000))


def test_best_fitting_dtype_and_impl():
    assert best_fitting_dtype(50257) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32
    with pytest.raises(ValueError, match="data_impl 'cached' is not supported"):
        make_dataset("x", impl="cached")
