"""``allow_chopped`` on one-document-per-sample data: documents longer than ``seq_length + 1``
tokens are cut to fit (true, the default) or left out (false; a pair is left out when either
side is too long), as GPT-NeoX builds its unpacked and pairwise samples."""

from __future__ import annotations

import numpy as np

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, make_dataset
from megatron.data.pairwise_dataset import UnpackedDataset

SEQ = 8  # samples hold seq_length + 1 = 9 tokens


def _dataset(path, lengths: list[int], base: int):
    builder = MMapIndexedDatasetBuilder(str(path) + ".bin", dtype=np.int32)
    for i, n in enumerate(lengths):
        builder.add_item(np.full(n, base + i, dtype=np.int32))  # every token names its document
        builder.end_document()
    builder.finalize(str(path) + ".idx")
    return make_dataset(str(path), "mmap", True)


def _docs(ds: UnpackedDataset, key: str = "text") -> set[int]:
    return {int(ds[i][key][0]) for i in range(len(ds))}


def test_allow_chopped_cuts_or_leaves_out_long_documents(tmp_path):
    text = _dataset(tmp_path / "text", [5, 9, 10, 30], base=100)  # docs 102 and 103 are long
    chopped = UnpackedDataset("train", {"text": text}, 40, SEQ, 1, allow_chopped=True)
    assert _docs(chopped) == {100, 101, 102, 103}
    long_sample = next(chopped[i] for i in range(len(chopped)) if chopped[i]["text"][0] == 103)
    assert list(long_sample["text"]) == [103] * (SEQ + 1)  # cut to seq_length + 1
    kept = UnpackedDataset("train", {"text": text}, 40, SEQ, 1, allow_chopped=False)
    assert len(kept) == 40 and _docs(kept) == {100, 101}
    short = next(kept[i] for i in range(len(kept)) if kept[i]["text"][0] == 100)
    assert list(short["label"]) == [100] * 5 + [-100] * 4  # padding never reaches the loss


def test_allow_chopped_false_leaves_out_pairs_with_either_side_too_long(tmp_path):
    pos = _dataset(tmp_path / "pos", [4, 4, 20, 6], base=200)
    neg = _dataset(tmp_path / "neg", [4, 15, 4, 6], base=300)
    parts = {"text": pos, "neg_text": neg}
    kept = UnpackedDataset("train", parts, 12, SEQ, 3, allow_chopped=False)
    assert _docs(kept) == {200, 203} and _docs(kept, "neg_text") == {300, 303}
    chopped = UnpackedDataset("train", parts, 12, SEQ, 3)
    assert _docs(chopped) == {200, 201, 202, 203}
