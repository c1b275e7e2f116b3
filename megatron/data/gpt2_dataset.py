"""Fixed-length GPT training samples packed across documents.

``GPT2Dataset(name, data_prefix, documents, indexed_dataset, num_samples, seq_length, seed)``
serves ``{"text": int64[seq_length + 1]}`` (plus ``"label"`` when a label dataset is given).
Documents (sequences of the indexed dataset) are concatenated in a shuffled order, one fresh
order per epoch, and cut into samples; sample ``i`` starts at token ``i * seq_length`` of
that stream. Three index arrays describe this (see :mod:`megatron.data.helpers`):

* ``doc_idx`` -- documents in stream order, every epoch a new permutation,
* ``sample_idx`` -- ``(position in doc_idx, offset)`` where each sample starts,
* ``shuffle_idx`` -- dataset index -> sample, shuffled within each epoch.

They are built once and cached as ``.npy`` files next to the data (or in ``cache_dir``),
named ``<prefix>_<name>_indexmap_<hash>_{doc,sample,shuffle}_idx.npy`` where ``<hash>``
covers every input that changes them: the dataset path, the selected documents, their token
count, ``num_samples``, ``seq_length``, ``seed`` and the index format version. A later run
with the same inputs memory-maps the cached files; any change gives a new name and a
rebuild. Files are written to temporary names and renamed, so a crash never leaves a
truncated cache. Under ``torch.distributed`` one rank builds -- the lowest rank with
``use_shared_fs=True``, the lowest rank of every node otherwise -- while the others wait at
a barrier and then load. Every rank of ``process_group`` (default: all ranks) must construct
the dataset; pass the group of the ranks that build datasets when only some of them do.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron.data import helpers
from megatron.data.indexed_dataset import MMapIndexedDataset

INDEX_FORMAT_VERSION = 1
_KINDS = ("doc", "sample", "shuffle")


def _dist() -> Any | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _is_builder_rank(use_shared_fs: bool, group: Any | None) -> bool:
    """Whether this rank builds: the lowest rank of ``group``, or of its node without a shared fs."""
    dist = _dist()
    if dist is None:
        return True
    rank = dist.get_rank()
    if use_shared_fs:
        members = (
            range(dist.get_world_size()) if group is None else dist.get_process_group_ranks(group)
        )
        return rank == min(members)
    peers: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(peers, (socket.gethostname(), rank), group=group)
    return rank == min(r for host, r in peers if host == socket.gethostname())


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def index_cache_files(
    name: str,
    data_prefix: str,
    documents: np.ndarray,
    tokens_per_epoch: int,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Paths of the cached index files for these inputs, and the description they hash."""
    documents = np.ascontiguousarray(documents, dtype=np.int64)
    desc = {
        "format_version": INDEX_FORMAT_VERSION,
        "data_prefix": os.path.abspath(data_prefix),
        "num_documents": len(documents),
        "documents_sha1": hashlib.sha1(documents.tobytes()).hexdigest(),
        "tokens_per_epoch": int(tokens_per_epoch),
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
    }
    digest = hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir is not None else Path(data_prefix).parent
    stem = f"{Path(data_prefix).name}_{name}_indexmap_{digest}"
    files = {kind: directory / f"{stem}_{kind}_idx.npy" for kind in _KINDS}
    files["description"] = directory / f"{stem}.json"
    return files, desc


def _build_and_save(
    files: dict[str, Path],
    desc: dict[str, Any],
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
) -> None:
    start = time.perf_counter()
    tokens_per_epoch = desc["tokens_per_epoch"]
    rng = np.random.default_rng(seed)
    try:
        num_epochs = helpers.num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
        doc_idx = helpers.build_doc_idx(documents, num_epochs, rng)
        sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length)
    except ValueError as e:
        raise ValueError(f"{desc['data_prefix']}: {e}") from None
    total = len(sample_idx) - 1
    bounds = helpers.epoch_sample_starts(tokens_per_epoch, num_epochs, seq_length, total)
    shuffle_idx = helpers.build_shuffle_idx(total, bounds, rng)
    files["doc"].parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(files["doc"], doc_idx)
    _save_atomic(files["sample"], sample_idx)
    _save_atomic(files["shuffle"], shuffle_idx)
    desc = dict(desc, num_epochs=num_epochs, total_samples=total)
    desc["build_seconds"] = round(time.perf_counter() - start, 3)
    tmp = files["description"].with_name(files["description"].name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(desc, indent=2) + "\n")
    os.replace(tmp, files["description"])


def load_or_build_indices(
    name: str,
    data_prefix: str,
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_shared_fs: bool = True,
    process_group: Any | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Path], bool]:
    """Load or build ``doc_idx``, ``sample_idx``, ``shuffle_idx``; returns (arrays, files, built)."""
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.asarray(sizes)[documents].sum(dtype=np.int64))
    files, desc = index_cache_files(
        name, data_prefix, documents, tokens_per_epoch, num_samples, seq_length, seed, cache_dir
    )
    built = False
    failure: BaseException | None = None
    if _is_builder_rank(use_shared_fs, process_group) and not all(
        files[k].exists() for k in _KINDS
    ):
        try:
            _build_and_save(files, desc, documents, sizes, num_samples, seq_length, seed)
            built = True
        except Exception as e:  # reach the barrier first so that waiting ranks are released
            failure = e
    dist = _dist()
    if dist is not None:
        dist.barrier(group=process_group)
    if failure is not None:
        raise failure
    missing = [str(files[k]) for k in _KINDS if not files[k].exists()]
    if missing:
        raise FileNotFoundError(
            f"index cache file {missing[0]} is missing after the building rank finished; "
            "if nodes do not share this file system set use_shared_fs to false"
        )
    arrays = {k: _load_index(files[k]) for k in _KINDS}
    check_indices(arrays, files, len(documents), sizes, documents)
    return arrays, files, built


class DataError(ValueError):
    """Bad data on disk (a damaged index cache, token ids the model cannot embed): the message
    names the file."""


def _load_index(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: damaged index cache ({exc}); delete it to rebuild the "
                        "index") from None


def check_indices(arrays: dict[str, np.ndarray], files: dict[str, Path], num_docs: int,
                  sizes: np.ndarray, documents: np.ndarray) -> None:
    """Loaded index caches must describe this dataset: a truncated, zeroed or foreign file
    is one error naming it (sample_idx rows strictly increase, since every sample holds
    seq_length tokens; every index stays in range). One vectorized pass per array."""
    doc, sample, shuffle = arrays["doc"], arrays["sample"], arrays["shuffle"]

    def bad(kind: str, what: str) -> DataError:
        return DataError(f"{files[kind]}: damaged index cache ({what}); delete it to rebuild "
                         "the index")

    if doc.ndim != 1 or doc.dtype.kind not in "iu" or len(doc) < num_docs:
        raise bad("doc", f"shape {doc.shape} {doc.dtype}")
    if len(doc) and (doc.min() < documents.min() or doc.max() > documents.max()):
        raise bad("doc", "document ids outside the dataset")
    if sample.ndim != 2 or sample.shape[1] != 2 or sample.dtype.kind not in "iu" \
            or len(sample) < 2:
        raise bad("sample", f"shape {sample.shape} {sample.dtype}")
    d, o = sample[:, 0], sample[:, 1]
    if d.min() < 0 or d.max() >= len(doc) or o.min() < 0:
        raise bad("sample", "positions outside the documents")
    rising = (d[1:] > d[:-1]) | ((d[1:] == d[:-1]) & (o[1:] > o[:-1]))
    if not rising.all():
        first = int(np.argmin(rising)) + 1
        raise bad("sample", f"row {first} does not advance past row {first - 1}")
    if (o > np.asarray(sizes)[np.asarray(doc)[d]]).any():
        raise bad("sample", "offsets beyond the end of their documents")
    total = len(sample) - 1
    if shuffle.ndim != 1 or shuffle.dtype.kind not in "iu" or len(shuffle) != total:
        raise bad("shuffle", f"shape {shuffle.shape} {shuffle.dtype}, expected ({total},)")
    if total and (shuffle.min() < 0 or shuffle.max() >= total):
        raise bad("shuffle", "sample ids outside the index")


class GPT2Dataset(torch.utils.data.Dataset):
    """``seq_length + 1``-token samples over ``documents`` of ``indexed_dataset``."""

    def __init__(
        self,
        name: str,
        data_prefix: str,
        documents: np.ndarray,
        indexed_dataset: MMapIndexedDataset,
        num_samples: int,
        seq_length: int,
        seed: int,
        build_index_mappings: bool = True,
        use_shared_fs: bool = True,
        label_dataset: MMapIndexedDataset | None = None,
        cache_dir: str | os.PathLike | None = None,
        process_group: Any | None = None,
    ):
        self.name = name
        self.data_prefix = str(data_prefix)
        self.indexed_dataset = indexed_dataset
        self.label_dataset = label_dataset
        self.seq_length = int(seq_length)
        documents = np.asarray(documents)
        if len(documents) == 0:
            raise ValueError(f"{name} dataset from {data_prefix} has no documents")
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise ValueError(
                f"{name} dataset: documents {documents.min()}..{documents.max()} outside "
                f"{data_prefix} ({len(indexed_dataset)} sequences)"
            )
        if label_dataset is not None and not np.array_equal(
            label_dataset.sizes, indexed_dataset.sizes
        ):
            raise ValueError(
                f"label dataset {label_dataset.path_prefix} is not aligned with {data_prefix}: "
                "their sequence lengths differ"
            )
        self.index_built = False
        self.index_files: dict[str, Path] = {}
        self.vocab_size: int | None = None  # set by check_token_ids: ids must stay below it
        if build_index_mappings:
            arrays, self.index_files, self.index_built = load_or_build_indices(
                name,
                self.data_prefix,
                documents,
                indexed_dataset.sizes,
                num_samples,
                self.seq_length,
                seed,
                cache_dir=cache_dir,
                use_shared_fs=use_shared_fs,
                process_group=process_group,
            )
            self._set_arrays(arrays)

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.doc_idx = arrays["doc"]
        self.sample_idx = arrays["sample"]
        self.shuffle_idx = arrays["shuffle"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("doc_idx", "sample_idx", "shuffle_idx"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.index_files:
            self._set_arrays({k: _load_index(self.index_files[k]) for k in _KINDS})

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def sample_tokens(self, sample: int, dataset: MMapIndexedDataset | None = None) -> np.ndarray:
        """Tokens of unshuffled sample ``sample`` (from ``dataset``, the text by default)."""
        ds = self.indexed_dataset if dataset is None else dataset
        d0, o0 = (int(x) for x in self.sample_idx[sample])
        d1, o1 = (int(x) for x in self.sample_idx[sample + 1])
        doc_idx = self.doc_idx
        if d0 == d1:
            return ds.get(int(doc_idx[d0]), offset=o0, length=o1 - o0 + 1)
        parts = [ds.get(int(doc_idx[d0]), offset=o0)]
        parts.extend(ds.get(int(doc_idx[d])) for d in range(d0 + 1, d1))
        parts.append(ds.get(int(doc_idx[d1]), length=o1 + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        n = len(self.shuffle_idx)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} out of range for {self.name} dataset ({n} samples)")
        sample = int(self.shuffle_idx[idx])
        out = {"text": self.sample_tokens(sample).astype(np.int64)}
        if self.vocab_size is not None and len(out["text"]) \
                and int(out["text"].max()) >= self.vocab_size:
            d0, d1 = int(self.sample_idx[sample][0]), int(self.sample_idx[sample + 1][0])
            docs = sorted({int(self.doc_idx[d0]), int(self.doc_idx[d1])})
            raise DataError(
                f"{self.data_prefix}.bin: token id {int(out['text'].max())} in document "
                f"{'..'.join(map(str, docs))} is outside the model's vocabulary of "
                f"{self.vocab_size} (was the data prepared with another tokenizer?)")
        if self.label_dataset is not None:
            out["label"] = self.sample_tokens(sample, self.label_dataset).astype(np.int64)
        return out


def check_token_ids(dataset: Any, vocab_size: int) -> None:
    """Make every GPT2Dataset under ``dataset`` (blends included) refuse samples holding token
    ids the embedding cannot look up, with an error naming the file (checked per sample: one
    max over seq_length tokens)."""
    if dataset is None:
        return
    if isinstance(dataset, GPT2Dataset):
        dataset.vocab_size = int(vocab_size)
    for child in getattr(dataset, "datasets", ()):
        check_token_ids(child, vocab_size)
