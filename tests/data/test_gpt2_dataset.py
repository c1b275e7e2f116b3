from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron.data import helpers
from megatron.data.data_utils import (
    build_train_valid_test_datasets,
    get_train_valid_test_split_,
    parse_split,
    weights_by_num_documents,
)
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.neox_arguments.groups_io import DataArgs

EOD = 0


def make_corpus(prefix, num_docs=60, seed=0, max_len=90, labels=False):
    """Random documents (ids 1..999, each ending in EOD); optionally a parallel label set."""
    rng = np.random.default_rng(seed)
    docs = [
        np.append(rng.integers(1, 1000, size=rng.integers(1, max_len)), EOD)
        for _ in range(num_docs)
    ]
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    if labels:
        lab = MMapIndexedDatasetBuilder(f"{prefix}_label.bin", dtype=np.int32)
        for doc in docs:
            lab.add_item(np.where(doc % 3 == 0, -100, doc).astype(np.int32))
            lab.end_document()
        lab.finalize(f"{prefix}_label.idx")
    return docs


def make_dataset(prefix, num_samples, seq_length, seed, documents=None, **kwargs):
    indexed = MMapIndexedDataset(prefix)
    if documents is None:
        documents = np.arange(len(indexed))
    return GPT2Dataset(
        "train", str(prefix), documents, indexed, num_samples, seq_length, seed, **kwargs
    )


def test_vectorized_sample_index_matches_reference_loop():
    rng = np.random.default_rng(3)
    for trial in range(20):
        sizes = rng.integers(0, 40, size=rng.integers(5, 200)).astype(np.int32)
        sizes[rng.integers(0, len(sizes))] = 25  # at least some tokens
        doc_idx = helpers.build_doc_idx(np.arange(len(sizes)), int(rng.integers(1, 4)), rng)
        seq = int(rng.integers(1, 50))
        if sizes[doc_idx].sum() < seq + 1:
            continue
        fast = helpers.build_sample_idx(sizes, doc_idx, seq)
        slow = helpers.build_sample_idx_reference(sizes, doc_idx, seq)
        np.testing.assert_array_equal(fast, slow, err_msg=f"trial {trial}")


def test_num_epochs_is_minimal():
    for tokens, seq, n in [(1000, 10, 99), (1000, 10, 100), (1000, 10, 250), (7, 3, 5)]:
        e = helpers.num_epochs_needed(tokens, seq, n)
        assert (e * tokens - 1) // seq >= n
        assert e == 1 or ((e - 1) * tokens - 1) // seq < n


def test_samples_tile_every_epoch_exactly_once(tmp_path):
    docs = make_corpus(tmp_path / "c", num_docs=40)
    seq = 16
    tokens_per_epoch = sum(len(d) for d in docs)
    num_samples = int(2.5 * tokens_per_epoch) // seq
    ds = make_dataset(tmp_path / "c", num_samples, seq, seed=7)
    assert len(ds) >= num_samples
    n_epochs = len(ds.doc_idx) // len(docs)
    assert n_epochs == 3

    # The first seq_length tokens of consecutive (unshuffled) samples form the token stream.
    stream = np.concatenate([ds.sample_tokens(i)[:seq] for i in range(len(ds))])
    for i in range(len(ds)):
        assert len(ds.sample_tokens(i)) == seq + 1
    for i in range(len(ds) - 1):  # the last token of a sample is the first of the next
        assert ds.sample_tokens(i)[-1] == ds.sample_tokens(i + 1)[0]
    for e in range(n_epochs):
        order = np.asarray(ds.doc_idx[e * len(docs) : (e + 1) * len(docs)])
        assert sorted(order.tolist()) == list(range(len(docs)))  # every document once per epoch
        segment = stream[e * tokens_per_epoch : (e + 1) * tokens_per_epoch]
        if len(segment) == tokens_per_epoch:  # complete epochs in the stream
            np.testing.assert_array_equal(segment, np.concatenate([docs[d] for d in order]))
            assert sorted(segment.tolist()) == sorted(np.concatenate(docs).tolist())
    # consecutive epochs use different orders
    assert not np.array_equal(ds.doc_idx[: len(docs)], ds.doc_idx[len(docs) : 2 * len(docs)])

    # Shuffling stays inside each epoch: the first k dataset indices are exactly that epoch's samples.
    starts = [-(-(e * tokens_per_epoch) // seq) for e in range(n_epochs)] + [len(ds)]
    shuffle = np.asarray(ds.shuffle_idx)
    for lo, hi in zip(starts[:-1], starts[1:]):
        assert sorted(shuffle[lo:hi].tolist()) == list(range(lo, hi))
    assert not np.array_equal(shuffle[: starts[1]], np.arange(starts[1]))
    np.testing.assert_array_equal(ds[5]["text"], ds.sample_tokens(int(shuffle[5])))
    assert ds[5]["text"].dtype == np.int64


def test_index_building_is_deterministic(tmp_path):
    make_corpus(tmp_path / "c")
    a = make_dataset(tmp_path / "c", 200, 32, seed=11, cache_dir=tmp_path / "cache_a")
    b = make_dataset(tmp_path / "c", 200, 32, seed=11, cache_dir=tmp_path / "cache_b")
    assert a.index_built and b.index_built
    for key in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert all(np.array_equal(a[i]["text"], b[i]["text"]) for i in range(len(a)))
    c = make_dataset(tmp_path / "c", 200, 32, seed=12, cache_dir=tmp_path / "cache_c")
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_index_cache_is_reused_and_invalidated(tmp_path):
    make_corpus(tmp_path / "c")
    first = make_dataset(tmp_path / "c", 300, 32, seed=1)
    assert first.index_built
    files = {k: first.index_files[k] for k in ("doc", "sample", "shuffle")}
    assert all(f.parent == tmp_path for f in files.values())
    mtimes = {k: f.stat().st_mtime_ns for k, f in files.items()}

    again = make_dataset(tmp_path / "c", 300, 32, seed=1)
    assert not again.index_built
    assert {k: again.index_files[k] for k in files} == files
    assert {k: f.stat().st_mtime_ns for k, f in files.items()} == mtimes
    np.testing.assert_array_equal(again.shuffle_idx, first.shuffle_idx)

    variants = [
        dict(num_samples=301, seq_length=32, seed=1),
        dict(num_samples=300, seq_length=31, seed=1),
        dict(num_samples=300, seq_length=32, seed=2),
        dict(num_samples=300, seq_length=32, seed=1, documents=np.arange(50)),
    ]
    names = {files["doc"].name}
    for v in variants:
        documents = v.pop("documents", None)
        ds = make_dataset(
            tmp_path / "c", v["num_samples"], v["seq_length"], v["seed"], documents=documents
        )
        assert ds.index_built, v
        names.add(ds.index_files["doc"].name)
    assert len(names) == 1 + len(variants)
    assert not list(tmp_path.glob("*.tmp"))


def test_label_dataset_is_aligned(tmp_path):
    make_corpus(tmp_path / "c", labels=True)
    text = MMapIndexedDataset(tmp_path / "c")
    labels = MMapIndexedDataset(tmp_path / "c_label")
    ds = GPT2Dataset(
        "train", str(tmp_path / "c"), np.arange(len(text)), text, 100, 20, 3, label_dataset=labels
    )
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"].shape == item["text"].shape == (21,)
        masked = item["text"] % 3 == 0
        np.testing.assert_array_equal(item["label"][~masked], item["text"][~masked])
        assert np.all(item["label"][masked] == -100)
    make_corpus(tmp_path / "other", num_docs=61)
    with pytest.raises(ValueError, match="is not aligned with"):
        GPT2Dataset(
            "train",
            str(tmp_path / "c"),
            np.arange(len(text)),
            text,
            100,
            20,
            3,
            label_dataset=MMapIndexedDataset(tmp_path / "other"),
        )


def test_parse_split():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("969, 30, 1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'9a,1'"):
        parse_split("9a,1")
    with pytest.raises(ValueError, match="positive sum"):
        parse_split("0,0,0")
    assert get_train_valid_test_split_("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split_("1,1,1", 10) == [0, 3, 7, 10]


def test_weights_by_num_documents():
    # shares 0.1 / 0.9, alpha 0.5: sqrt gives 0.3162 / 0.9487 -> normalized 0.25 / 0.75
    assert weights_by_num_documents([100, 900], 0.5) == pytest.approx([0.25, 0.75])
    assert weights_by_num_documents([100, 900], 1.0) == pytest.approx([0.1, 0.9])
    assert weights_by_num_documents([100, 900], 0.0) == pytest.approx([0.5, 0.5])


def test_build_from_data_path_and_split(tmp_path):
    make_corpus(tmp_path / "c", num_docs=100)
    cfg = DataArgs(
        data_path=str(tmp_path / "c"), split="80, 15, 5", data_cache_dir=str(tmp_path / "cache")
    )
    train, valid, test = build_train_valid_test_datasets(
        cfg, seq_length=24, seed=5, train_val_test_num_samples=[500, 40, 0]
    )
    assert test is None
    assert len(train) >= 500 and len(valid) >= 40
    assert sorted(set(np.asarray(train.doc_idx).tolist())) == list(range(0, 80))
    assert sorted(set(np.asarray(valid.doc_idx).tolist())) == list(range(80, 95))
    assert train[0]["text"].shape == (25,)
    assert train.index_files["doc"].parent == valid.index_files["doc"].parent == tmp_path / "cache"


def test_build_blend_from_paths(tmp_path):
    make_corpus(tmp_path / "a", num_docs=30, seed=1)
    make_corpus(tmp_path / "b", num_docs=90, seed=2)
    cfg = DataArgs(
        train_data_paths=[str(tmp_path / "a"), str(tmp_path / "b")],
        train_data_weights=[3.0, 1.0],
        valid_data_paths=[str(tmp_path / "b")],
        test_data_paths=None,
    )
    train, valid, test = build_train_valid_test_datasets(
        cfg, seq_length=16, seed=1, train_val_test_num_samples=[2000, 50, 10]
    )
    assert test is None and len(train) == 2000 and len(valid) == 50
    counts = np.bincount(train.dataset_index, minlength=2)
    assert counts.tolist() == [1500, 500]
    cfg = dataclasses.replace(cfg, weight_by_num_documents=True, weighted_sampler_alpha=1.0)
    train, _, _ = build_train_valid_test_datasets(
        cfg, seq_length=16, seed=1, train_val_test_num_samples=[2000, 0, 0]
    )
    assert np.bincount(train.dataset_index, minlength=2).tolist() == [500, 1500]
    cfg = dataclasses.replace(cfg, train_data_weights=[1.0], weight_by_num_documents=False)
    with pytest.raises(
        ValueError, match="train_data_weights has 1 entries but train_data_paths has 2"
    ):
        build_train_valid_test_datasets(
            cfg, seq_length=16, seed=1, train_val_test_num_samples=[10, 0, 0]
        )


def test_valid_and_test_blends_labels_and_mmap_warmup(tmp_path, monkeypatch):
    from megatron.data import indexed_dataset

    make_corpus(tmp_path / "a", num_docs=30, seed=1, labels=True)
    make_corpus(tmp_path / "b", num_docs=40, seed=2, labels=True)
    warmed: list[str] = []
    monkeypatch.setattr(indexed_dataset, "_warmup", lambda path: warmed.append(str(path)))
    pair = [str(tmp_path / "a"), str(tmp_path / "b")]
    labels = [p + "_label" for p in pair]
    cfg = DataArgs(
        train_data_paths=pair, valid_data_paths=pair, test_data_paths=pair,
        valid_data_weights=[1.0, 3.0], test_data_weights=[4.0, 1.0],
        train_label_data_paths=labels, valid_label_data_paths=labels,
        test_label_data_paths=labels, data_cache_dir=str(tmp_path / "cache"),
    )
    train, valid, test = build_train_valid_test_datasets(
        cfg, seq_length=16, seed=1, train_val_test_num_samples=[40, 400, 500]
    )
    assert np.bincount(valid.dataset_index, minlength=2).tolist() == [100, 300]
    assert np.bincount(test.dataset_index, minlength=2).tolist() == [400, 100]
    for split in (train, valid, test):
        sample = split[3]
        text, label = sample["text"], sample["label"]
        assert label.shape == text.shape
        assert np.array_equal(np.where(text % 3 == 0, -100, text), label)
    assert warmed == []  # mmap_warmup off: the files are not read ahead
    build_train_valid_test_datasets(
        dataclasses.replace(cfg, mmap_warmup=True), seq_length=16, seed=1,
        train_val_test_num_samples=[40, 0, 0],
    )
    assert sorted(set(warmed)) == sorted(
        str(tmp_path / f"{name}.bin") for name in ("a", "a_label", "b", "b_label"))


def test_missing_data_config_is_an_error():
    with pytest.raises(ValueError, match="data_path or train_data_paths"):
        build_train_valid_test_datasets(
            DataArgs(), seq_length=8, seed=1, train_val_test_num_samples=[1, 0, 0]
        )


def test_dataset_pickles_small_and_loads_in_workers(tmp_path):
    import pickle

    from megatron.data.samplers import build_data_loader

    make_corpus(tmp_path / "c", num_docs=200, labels=True)
    text, labels = MMapIndexedDataset(tmp_path / "c"), MMapIndexedDataset(tmp_path / "c_label")
    ds = GPT2Dataset(
        "train", str(tmp_path / "c"), np.arange(len(text)), text, 2000, 32, 9, label_dataset=labels
    )
    blob = pickle.dumps(ds)
    assert len(blob) < 4000  # file names, not the index arrays
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(copy[17]["text"], ds[17]["text"])
    loader = build_data_loader(
        ds, consumed_samples=40, micro_batch_size=4, dp_rank=0, dp_size=2, num_workers=2
    )
    batch = next(iter(loader))
    np.testing.assert_array_equal(
        batch["text"].numpy(), np.stack([ds[i]["text"] for i in range(40, 44)])
    )
    np.testing.assert_array_equal(
        batch["label"].numpy(), np.stack([ds[i]["label"] for i in range(40, 44)])
    )


def _distributed_rank(rank, world, tmp, use_shared_fs, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        ds = make_dataset(tmp / "c", 400, 32, seed=4, use_shared_fs=use_shared_fs)
        queue.put((rank, ds.index_built, np.asarray(ds.shuffle_idx).tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("use_shared_fs", [True, False])
def test_one_rank_builds_the_others_wait_and_load(tmp_path, use_shared_fs):
    import multiprocessing as mp

    make_corpus(tmp_path / "c")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_distributed_rank, args=(r, 2, tmp_path, use_shared_fs, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # rank 0 is the lowest rank overall and on this host: it builds, rank 1 only loads
    assert [(r, built) for r, built, _ in results] == [(0, True), (1, False)]
    assert results[0][2] == results[1][2]


def test_documents_without_tokens_are_a_clear_error(tmp_path):
    builder = MMapIndexedDatasetBuilder(tmp_path / "empty.bin", dtype=np.uint16)
    builder.add_item([])
    builder.end_document()
    builder.finalize(tmp_path / "empty.idx")
    with pytest.raises(
        ValueError, match=r"empty: cannot build samples from documents that hold no tokens"
    ):
        make_dataset(tmp_path / "empty", 10, 8, seed=1)
    assert not list(tmp_path.glob("*.npy"))
