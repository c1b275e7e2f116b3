"""Memory-mapped token files in the Megatron ``.bin`` + ``.idx`` format.

A dataset called ``PREFIX`` is two files. ``PREFIX.bin`` is the raw concatenation of every
sequence's elements (no header, native little-endian). ``PREFIX.idx`` describes it:

==========  =========================  ===============================================
bytes       type                       meaning
==========  =========================  ===============================================
9           ``b"MMIDIDX\\x00\\x00"``    magic
8           ``<Q``                     version, always 1
1           ``<B``                     element dtype code (table below)
8           ``<Q``                     number of sequences ``N``
8           ``<Q``                     number of ``doc_idx`` entries ``D``
4 * N       int32                      sequence lengths (elements)
8 * N       int64                      byte offset of each sequence in ``.bin``
8 * D       int64                      ``doc_idx``: starts with 0; every ``end_document``
                                       appends the current number of sequences, so
                                       document ``k`` is sequences
                                       ``doc_idx[k]:doc_idx[k+1]``
==========  =========================  ===============================================

Offsets are the running sum of ``length * itemsize`` starting at 0, so the files written
here are byte-identical to Megatron-LM's builder given the same input and move freely
between this project, GPT-NeoX and Megatron-LM.

dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16.
Codes 6 and 7 follow Megatron-LM; GPT-NeoX's table has them the other way round (6 float32,
7 float64). Token files are integer-typed and unaffected; a float file written by GPT-NeoX
reads with the wrong element type here (and vice versa).

Public API:

* ``MMapIndexedDataset(prefix)`` -- O(1) random access: ``ds[i]``, ``ds[a:b]``,
  ``ds.get(i, offset, length)``, ``ds.sizes``, ``ds.doc_idx``, ``len(ds)``,
  ``MMapIndexedDataset.exists(prefix)``. Malformed files raise :class:`IndexedDatasetError`
  naming the file.
* ``MMapIndexedDatasetBuilder(bin_path, dtype)`` -- streaming writer with ``add_item``,
  ``add_document``, ``end_document``, ``merge_file_``, ``finalize(idx_path)`` and
  ``discard``. Output goes to temporary names and is renamed into place by ``finalize``, so
  an interrupted writer never leaves a pair of files that looks complete.
* ``best_fitting_dtype(vocab_size)``, ``make_dataset``, ``make_builder``,
  ``data_file_path``, ``index_file_path``.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Above this many sequences the reader checks the index in O(1) at open time and bounds-checks
# each access instead of validating every offset up front.
_FULL_VALIDATION_MAX_SEQUENCES = 1 << 26
_COPY_CHUNK = 16 << 20
_WRITE_BUFFER = 1 << 20


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated or inconsistent."""


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def dtype_code(dtype: Any) -> int:
    """The ``.idx`` code of a numpy dtype; ``ValueError`` for types the format cannot hold."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        names = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt} cannot be stored in an indexed dataset (supported: {names})")
    return _CODE_OF_DTYPE[dt]


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 when every token id fits (``vocab_size < 65500``), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


class _Index:
    """Parsed ``.idx`` file: dtype, sizes, pointers and doc_idx as arrays over a memmap."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise IndexedDatasetError(f"index file {path} does not exist")
        nbytes = os.path.getsize(path)
        if nbytes < _HEADER.size:
            raise IndexedDatasetError(
                f"index file {path} is truncated: {nbytes} bytes, the header alone is {_HEADER.size}"
            )
        with open(path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"index file {path} has bad magic {magic!r} (expected {INDEX_MAGIC!r}); "
                "it is not an mmap indexed dataset"
            )
        if version != INDEX_VERSION:
            raise IndexedDatasetError(
                f"index file {path} has unsupported version {version} (expected {INDEX_VERSION})"
            )
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"index file {path} has unknown dtype code {code} (known: {sorted(DTYPE_CODES)})"
            )
        expected = _HEADER.size + n_seq * 12 + n_doc * 8
        if nbytes != expected:
            raise IndexedDatasetError(
                f"index file {path} is truncated or corrupt: {n_seq} sequences and {n_doc} "
                f"doc_idx entries need {expected} bytes, the file has {nbytes}"
            )
        if n_doc < 1:
            raise IndexedDatasetError(f"index file {path} is corrupt: doc_idx is empty")
        self.dtype = DTYPE_CODES[code]
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mmap)
        off = _HEADER.size
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += self.sizes.nbytes
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += self.pointers.nbytes
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)

    def __len__(self) -> int:
        return len(self.sizes)

    def validate(self, bin_nbytes: int, bin_path: str, *, full: bool) -> None:
        n = len(self.sizes)
        doc_idx = self.doc_idx
        if doc_idx[0] != 0 or doc_idx[-1] > n:
            raise IndexedDatasetError(
                f"index file {self.path} is corrupt: doc_idx runs from {doc_idx[0]} to "
                f"{doc_idx[-1]}, expected 0 to at most {n}"
            )
        itemsize = self.dtype.itemsize
        if n == 0:
            end = 0
        else:
            end = int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize
        if end != bin_nbytes:
            raise IndexedDatasetError(
                f"data file {bin_path} has {bin_nbytes} bytes but its index {self.path} "
                f"describes {end}; the pair is truncated or mismatched"
            )
        if not full or n == 0:
            return
        if np.any(np.diff(doc_idx) < 0):
            raise IndexedDatasetError(f"index file {self.path} is corrupt: doc_idx decreases")
        sizes = self.sizes.astype(np.int64)
        ends = self.pointers + sizes * itemsize
        if sizes.min() < 0 or self.pointers.min() < 0 or ends.max() > bin_nbytes:
            bad = int(np.argmax((sizes < 0) | (self.pointers < 0) | (ends > bin_nbytes)))
            raise IndexedDatasetError(
                f"index file {self.path} is corrupt: sequence {bad} (offset "
                f"{int(self.pointers[bad])}, length {int(sizes[bad])}) lies outside {bin_path} "
                f"({bin_nbytes} bytes)"
            )


def _append_file(src: Any, dst: Any) -> None:
    """Append all of ``src`` to ``dst`` in the kernel where it can (``copy_file_range``)."""
    dst.flush()
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while copy_range(src.fileno(), dst.fileno(), _COPY_CHUNK):
                pass
            return
        except OSError:  # e.g. a filesystem without it: copy through user space
            pass
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _warmup(path: str) -> None:
    buf = bytearray(_COPY_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


class MMapIndexedDataset:
    """Read-only random access to an indexed dataset ``PREFIX.bin`` + ``PREFIX.idx``.

    Items are numpy arrays viewing the memory map (no copy). ``validate=None`` checks every
    offset up front for indexes of up to 2**26 sequences and only O(1) header/size checks
    beyond that; ``get`` always bounds-checks the sequence it reads.
    """

    supports_prefetch = False

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        skip_warmup: bool = True,
        *,
        validate: bool | None = None,
    ):
        self._prefix = os.fspath(path_prefix)
        self._validate = validate
        self._open(skip_warmup)

    def _open(self, skip_warmup: bool) -> None:
        bin_path = data_file_path(self._prefix)
        self._index = _Index(index_file_path(self._prefix))
        if not os.path.isfile(bin_path):
            raise IndexedDatasetError(f"data file {bin_path} does not exist")
        nbytes = os.path.getsize(bin_path)
        full = self._validate
        if full is None:
            full = len(self._index) <= _FULL_VALIDATION_MAX_SEQUENCES
        self._index.validate(nbytes, bin_path, full=full)
        if not skip_warmup:
            _warmup(bin_path)
        self._bin_nbytes = nbytes
        self._bin_path = bin_path
        if nbytes:
            self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r")
        else:
            self._bin = np.zeros(0, dtype=np.uint8)

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self._prefix, "validate": self._validate}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._prefix = state["prefix"]
        self._validate = False
        self._open(skip_warmup=True)
        self._validate = state["validate"]

    @property
    def path_prefix(self) -> str:
        return self._prefix

    @property
    def dtype(self) -> np.dtype:
        return self._index.dtype

    @property
    def sizes(self) -> np.ndarray:
        """int32 length of every sequence."""
        return self._index.sizes

    @property
    def doc_idx(self) -> np.ndarray:
        """int64 document boundaries: document k is sequences ``doc_idx[k]:doc_idx[k+1]``."""
        return self._index.doc_idx

    @property
    def pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the ``.bin`` file."""
        return self._index.pointers

    @property
    def num_documents(self) -> int:
        return len(self._index.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._index.sizes.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self._index)

    def _check_index(self, idx: int) -> int:
        n = len(self._index)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {idx} out of range for {self._prefix} ({n} sequences)")
        return i

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                return [self.get(i) for i in range(start, stop, step)]
            if stop <= start:
                return []
            sizes = self._index.sizes[start:stop]
            total = int(sizes.sum(dtype=np.int64))
            flat = self._read(int(self._index.pointers[start]), total, start)
            return np.split(flat, np.cumsum(sizes, dtype=np.int64)[:-1])
        if isinstance(idx, (int, np.integer)):
            return self.get(idx)
        raise TypeError(
            f"indices of {self._prefix} must be integers or slices, not {type(idx).__name__}"
        )

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``offset:offset+length`` of sequence ``idx`` (to its end by default)."""
        i = self._check_index(idx)
        size = int(self._index.sizes[i])
        if offset < 0 or offset > size:
            raise IndexError(
                f"offset {offset} outside sequence {i} of {self._prefix} (length {size})"
            )
        if length is None:
            length = size - offset
        if length < 0 or offset + length > size:
            raise IndexError(
                f"length {length} at offset {offset} runs past sequence {i} of {self._prefix} "
                f"(length {size})"
            )
        ptr = int(self._index.pointers[i]) + offset * self.dtype.itemsize
        return self._read(ptr, length, i)

    def _read(self, byte_offset: int, count: int, seq: int) -> np.ndarray:
        end = byte_offset + count * self.dtype.itemsize
        if byte_offset < 0 or end > self._bin_nbytes:
            raise IndexedDatasetError(
                f"sequence {seq} of {self._index.path} points at bytes {byte_offset}:{end}, "
                f"outside {self._bin_path} ({self._bin_nbytes} bytes)"
            )
        return np.frombuffer(self._bin, dtype=self.dtype, count=count, offset=byte_offset)

    def get_document(self, doc: int) -> np.ndarray:
        """All elements of document ``doc`` concatenated."""
        n = self.num_documents
        if not 0 <= doc < n:
            raise IndexError(f"document {doc} out of range for {self._prefix} ({n} documents)")
        first, last = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        if last == first:
            return np.zeros(0, dtype=self.dtype)
        total = int(self.sizes[first:last].sum(dtype=np.int64))
        return self._read(int(self.pointers[first]), total, first)

    @staticmethod
    def exists(path_prefix: str | os.PathLike) -> bool:
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(
            data_file_path(path_prefix)
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(bin_path: str) -> list[str]:
    """Delete ``<bin_path>.<pid>.tmp`` and ``<idx_path>.<pid>.tmp`` left by a writer that was
    killed (SIGKILL, a crash: nothing could clean up), when that process is gone. Files of a
    live writer are left alone. Returns the removed paths (each is noted on stderr)."""
    import glob
    import re
    import sys

    removed = []
    stem = bin_path[:-4] if bin_path.endswith(".bin") else bin_path
    for pattern in (f"{glob.escape(bin_path)}.*.tmp", f"{glob.escape(stem)}.idx.*.tmp"):
        for path in glob.glob(pattern):
            m = re.search(r"\.(\d+)\.tmp$", path)
            if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
                continue
            try:
                os.remove(path)
            except OSError:
                continue
            removed.append(path)
            print(f"removed {path}, left by an interrupted run (process {m.group(1)} is gone)",
                  file=sys.stderr)
    return removed


class MMapIndexedDatasetBuilder:
    """Streams sequences into ``bin_path`` and writes the matching ``.idx`` on ``finalize``.

    Lengths and document boundaries are kept as compact ``array`` buffers (4 and 8 bytes per
    entry). Integer input is range-checked against ``dtype`` so ids never wrap silently.
    Until ``finalize`` the data lives in ``<bin_path>.<pid>.tmp``; ``discard`` (or leaving a
    ``with`` block by an exception) deletes it.
    """

    def __init__(self, out_file: str | os.PathLike, dtype: Any = np.int64):
        self._bin_path = os.fspath(out_file)
        self._dtype = np.dtype(dtype)
        self._code = dtype_code(self._dtype)
        self._tmp_path = f"{self._bin_path}.{os.getpid()}.tmp"
        self._pid = os.getpid()
        remove_stale_temporaries(self._bin_path)
        self._file = open(self._tmp_path, "wb", buffering=_WRITE_BUFFER)
        self._sizes = array("i")
        self._doc_idx = array("q", [0])
        self._done = False
        if self._dtype.kind in "iu":
            info = np.iinfo(self._dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def _as_array(self, data: Any) -> np.ndarray:
        if hasattr(data, "detach"):  # torch tensor
            data = data.detach().cpu().numpy()
        arr = np.asarray(data)
        if arr.dtype != self._dtype:
            if self._range is not None and arr.size and arr.dtype.kind in "iub":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._range[0] or hi > self._range[1]:
                    bad = lo if lo < self._range[0] else hi
                    raise ValueError(
                        f"{self._bin_path}: value {bad} does not fit in dtype {self._dtype}"
                    )
            arr = arr.astype(self._dtype)
        return np.ascontiguousarray(arr).reshape(-1)

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"builder for {self._bin_path} is already finalized or discarded")

    def add_item(self, data: Any) -> None:
        """Append one sequence (torch tensor, numpy array or list of numbers)."""
        self._check_open()
        arr = self._as_array(data)
        self._file.write(memoryview(arr).cast("B"))
        self._sizes.append(arr.size)

    def add_document(self, data: Any, lengths: Sequence[int] | None = None) -> None:
        """Append a whole document: ``data`` split into sequences of ``lengths`` (one by default)."""
        self._check_open()
        arr = self._as_array(data)
        if lengths is None:
            lengths = [arr.size]
        elif sum(lengths) != arr.size:
            raise ValueError(
                f"{self._bin_path}: document lengths sum to {sum(lengths)} but it has {arr.size} elements"
            )
        self._file.write(memoryview(arr).cast("B"))
        self._sizes.extend(int(n) for n in lengths)
        self._doc_idx.append(len(self._sizes))

    def end_document(self) -> None:
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def merge_file_(self, another_file: str | os.PathLike) -> None:
        """Append every sequence and document of the dataset at prefix ``another_file``."""
        self._check_open()
        other = MMapIndexedDataset(another_file)
        if other.dtype != self._dtype:
            raise ValueError(
                f"cannot merge {os.fspath(another_file)}: its dtype {other.dtype} differs from "
                f"{self._dtype} of {self._bin_path}"
            )
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes, dtype=np.int32).tobytes())
        self._doc_idx.frombytes((other.doc_idx[1:] + offset).astype(np.int64).tobytes())
        with open(data_file_path(another_file), "rb") as f:
            _append_file(f, self._file)

    def finalize(self, index_file: str | os.PathLike) -> None:
        """Write the index and move both files to their final names."""
        self._check_open()
        index_file = os.fspath(index_file)
        self._file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self._dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        tmp_idx = f"{index_file}.{os.getpid()}.tmp"
        try:
            with open(tmp_idx, "wb") as f:
                f.write(
                    _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self._code, len(sizes), len(doc_idx))
                )
                f.write(sizes.tobytes(order="C"))
                f.write(pointers.tobytes(order="C"))
                f.write(doc_idx.tobytes(order="C"))
            # Drop an older index first: the old .idx never pairs with the new .bin.
            if os.path.lexists(index_file):
                os.remove(index_file)
            os.replace(self._tmp_path, self._bin_path)
            os.replace(tmp_idx, index_file)
        except BaseException:
            for path in (tmp_idx, self._tmp_path):
                if os.path.exists(path):
                    os.remove(path)
            self._done = True
            raise
        self._done = True

    def discard(self) -> None:
        """Abandon the output: close and delete the temporary data file."""
        if self._done:
            return
        self._done = True
        self._file.close()
        if os.path.exists(self._tmp_path):
            os.remove(self._tmp_path)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.discard()

    def __del__(self) -> None:
        # An abandoned builder must not leave a stray temporary file behind (only the process
        # that created it cleans up, never a forked copy).
        try:
            if getattr(self, "_pid", None) == os.getpid():
                self.discard()
        except Exception:
            pass


def _check_impl(impl: str) -> None:
    if impl not in ("mmap", "infer"):
        raise ValueError(f"data_impl {impl!r} is not supported; use 'mmap'")


def make_dataset(
    path_prefix: str | os.PathLike, impl: str = "mmap", skip_warmup: bool = True
) -> MMapIndexedDataset:
    """Open an indexed dataset (``impl`` is the ``data_impl`` config value: mmap or infer)."""
    _check_impl(impl)
    return MMapIndexedDataset(path_prefix, skip_warmup=skip_warmup)


def make_builder(
    out_file: str | os.PathLike, impl: str = "mmap", vocab_size: int | None = None
) -> MMapIndexedDatasetBuilder:
    """A builder whose dtype is ``best_fitting_dtype(vocab_size)``."""
    _check_impl(impl)
    return MMapIndexedDatasetBuilder(out_file, dtype=best_fitting_dtype(vocab_size))
