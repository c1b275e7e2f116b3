"""Streaming readers for the corpus formats the dataset tools accept.

Inputs are jsonl (one JSON object per line) or plain text, each optionally compressed with
gzip (``.gz``) or zstandard (``.zst``/``.zstd``); the format comes from the file name:
``*.jsonl``, ``*.json``, ``*.jsonl.gz``, ``*.jsonl.zst``, ``*.txt``, ``*.txt.gz``, ...

Plain-text documents are paragraphs separated by blank lines (``txt_mode="paragraph"``, the
default) or single lines (``txt_mode="line"``); their text is available under the key
``text``. Blank lines never make a document.

Reading is lazy: :func:`iter_records` yields ``(file_index, line_number, raw_bytes)`` one
record at a time and :func:`parse_record` turns a record into the requested texts or raises
:class:`BadRecord` with the reason.

Sharding (:class:`Shard`): the inputs, taken in order, are one sequence of bytes split into
``count`` equal byte ranges; shard ``index`` reads the records that *start* in its range.
Uncompressed files are entered with a seek (a shard that starts mid-file counts the lines
before it to keep line numbers right); a compressed file cannot be entered mid-way and
belongs whole to the shard in which it starts. The shards' records, in shard order, are
exactly the records of one unsharded read.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

JSONL = "jsonl"
TXT = "txt"
TXT_MODES = ("paragraph", "line")
_COMPRESSED = (".gz", ".zst", ".zstd")


class BadRecord(ValueError):
    """One input record cannot be used; the message says why."""


class InputError(ValueError):
    """An input file list is unusable (missing file, unknown format)."""


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated paths (or a list of them) with globs expanded; all must exist."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for item in str(part).split(","):
            item = item.strip()
            if not item:
                continue
            if any(ch in item for ch in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise InputError(f"input pattern {item} matches no file")
                out.extend(matches)
            elif not os.path.exists(item):
                raise InputError(f"input file {item} does not exist")
            else:
                out.append(item)
    if not out:
        raise InputError("no input files given")
    for path in out:
        input_kind(path)
    return out


def input_kind(path: str) -> str:
    """``"jsonl"`` or ``"txt"`` from the file name (compression suffix ignored)."""
    name = os.path.basename(path).lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return JSONL
    if name.endswith(".txt"):
        return TXT
    raise InputError(
        f"input file {path}: unknown format (expected .jsonl, .json or .txt, optionally .gz/.zst)"
    )


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of one or more concatenated zstandard frames; a file that ends
    inside a frame raises EOFError (zstandard's stream reader would just stop there)."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._zstd = zstandard
        self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._started = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise EOFError("compressed file ended in the middle of a zstandard frame")
                return 0
            while chunk:
                if self._obj.eof:  # the next frame begins
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                self._started = True
                self._pending += self._obj.decompress(chunk)
                chunk = self._obj.unused_data if self._obj.eof else b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: str) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing gzip / zstandard on the fly."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count`` equal byte ranges of the inputs."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InputError(f"--num-shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise InputError(
                f"--shard-index {self.index} is outside 0..{self.count - 1} (--num-shards {self.count})"
            )


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSED)


def shard_ranges(paths: Sequence[str], shard: Shard | None) -> list[tuple[int, int | None] | None]:
    """Per file: the byte range ``(start, end)`` whose records this shard reads, or None.

    ``end`` None means to the end of the file (used for whole files and unsharded reads).
    """
    if shard is None or shard.count == 1:
        return [(0, None)] * len(paths)
    sizes = []
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"input {path} is not a regular file; sharding needs file sizes")
        sizes.append(os.path.getsize(path))
    total = sum(sizes)
    lo, hi = total * shard.index // shard.count, total * (shard.index + 1) // shard.count
    out: list[tuple[int, int | None] | None] = []
    offset = 0
    for path, size in zip(paths, sizes):
        if _is_compressed(path):
            out.append((0, None) if lo <= offset < hi else None)
        else:
            start, end = max(lo - offset, 0), min(hi - offset, size)
            out.append((start, end) if start < end else None)
        offset += size
    return out


def _count_newlines(f: BinaryIO, end: int) -> int:
    f.seek(0)
    n, left = 0, end
    while left > 0:
        chunk = f.read(min(left, 16 << 20))
        if not chunk:
            break
        n += chunk.count(b"\n")
        left -= len(chunk)
    return n


def _previous_line(f: BinaryIO, start: int) -> bytes:
    """The line that ends right before offset ``start`` (a line start), without its newline."""
    end = start - 1  # the newline that ends it
    window = 1 << 16
    while True:
        lo = max(0, end - window)
        f.seek(lo)
        data = f.read(end - lo)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1 :]
        if lo == 0:
            return data
        window *= 4


def _damaged(path: str, lineno: int, exc: BaseException) -> InputError:
    """A compressed input that cannot be read to its end (truncated, a flipped byte)."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"input file {path} does not exist")
    what = "truncated or damaged" if path.lower().endswith(_COMPRESSED) else "unreadable"
    return InputError(f"input file {path}: {what} after line {lineno} ({exc})")


def _iter_lines(
    path: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes, bool]]:
    """``(line_number, line, starts_in_range)`` from the first line starting at or after
    ``start``; after ``end`` it keeps going (flag False) so a caller can finish a record."""
    if start == 0 and end is None:
        lineno = 0
        try:
            with open_binary(path) as f:
                for lineno, line in enumerate(f, start=1):
                    yield lineno, line, True
        except (EOFError, OSError, zlib.error) as exc:
            raise _damaged(path, lineno, exc) from None
        except Exception as exc:  # zstandard.ZstdError
            if type(exc).__name__ != "ZstdError":
                raise
            raise _damaged(path, lineno, exc) from None
        return
    with open(path, "rb", buffering=1 << 20) as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            if f.read(1) == b"\n":
                pos = start
            else:
                f.readline()  # the rest of a line that began before this range
                pos = f.tell()
        lineno = 1 + _count_newlines(f, pos) if pos else 1
        f.seek(pos)
        for line in f:
            yield lineno, line, end is None or pos < end
            pos += len(line)
            lineno += 1


def iter_records(
    paths: Sequence[str], txt_mode: str = "paragraph", shard: Shard | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(file_index, line_number, raw_bytes)`` for every document candidate."""
    if txt_mode not in TXT_MODES:
        raise InputError(f"txt mode {txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    for fi, (path, span) in enumerate(zip(paths, shard_ranges(paths, shard))):
        if span is None:
            continue
        start, end = span
        kind = input_kind(path)
        if kind == JSONL or txt_mode == "line":
            for lineno, line, inside in _iter_lines(path, start, end):
                if not inside:
                    break
                if line.strip():
                    yield fi, lineno, line
            continue
        # Paragraphs: a shard entering mid-paragraph leaves it to the shard where it began.
        skipping = False
        if start > 0:
            with open(path, "rb") as f:
                f.seek(start - 1)
                at_line_start = f.read(1) == b"\n"
                if at_line_start:
                    skipping = bool(_previous_line(f, start).strip())
                else:  # the first full line follows a partial one that began earlier
                    f.seek(start)
                    f.readline()
                    skipping = bool(_previous_line(f, f.tell()).strip())
        para: list[bytes] = []
        first = 0
        for lineno, line, inside in _iter_lines(path, start, end):
            blank = not line.strip()
            if skipping:
                skipping = not blank
                continue
            if not blank:
                if not para:
                    if not inside:
                        break
                    first = lineno
                para.append(line)
            elif para:
                yield fi, first, b"".join(para)
                para = []
                if not inside:
                    break
            elif not inside:
                break
        if para:
            yield fi, first, b"".join(para)


_JSON_TYPE_NAMES = {
    dict: "an object",
    list: "an array",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def parse_record(kind: str, raw: bytes, keys: Sequence[str]) -> list[str]:
    """The texts for ``keys`` in one record; :class:`BadRecord` when any is unusable."""
    if kind == TXT:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"invalid UTF-8 at byte {e.start}") from None
        text = text.rstrip("\r\n")
        if not text.strip():
            raise BadRecord("empty document")
        return [text]
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise BadRecord(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {_JSON_TYPE_NAMES.get(type(obj), 'a value')}")
    texts = []
    for key in keys:
        if key not in obj:
            raise BadRecord(f"missing key {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            what = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
            raise BadRecord(f"key {key!r} is {what}, not a string")
        if not value.strip():
            raise BadRecord(f"empty document in key {key!r}")
        texts.append(value)
    return texts


def check_keys_for_inputs(paths: Sequence[str], keys: Sequence[str]) -> None:
    """Plain-text inputs only provide ``text``."""
    if any(input_kind(p) == TXT for p in paths) and list(keys) != ["text"]:
        raise InputError(
            f"plain-text inputs only have the key 'text', but --jsonl-keys is {', '.join(keys)}"
        )


def iter_texts(
    paths: Sequence[str], keys: Sequence[str] = ("text",), txt_mode: str = "paragraph"
) -> Iterator[str]:
    """Every usable text of every record (bad records are skipped), for tokenizer training."""
    kinds = [input_kind(p) for p in paths]
    for fi, _lineno, raw in iter_records(paths, txt_mode):
        try:
            yield from parse_record(kinds[fi], raw, keys)
        except BadRecord:
            continue
