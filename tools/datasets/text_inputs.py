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
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

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


def open_binary(path: str) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing gzip / zstandard on the fly."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
    return open(path, "rb", buffering=1 << 20)


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open_binary(path) as f:
        yield from enumerate(f, start=1)


def iter_records(
    paths: Sequence[str], txt_mode: str = "paragraph"
) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(file_index, line_number, raw_bytes)`` for every document candidate."""
    if txt_mode not in TXT_MODES:
        raise InputError(f"txt mode {txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    for fi, path in enumerate(paths):
        kind = input_kind(path)
        if kind == JSONL or txt_mode == "line":
            for lineno, line in _iter_lines(path):
                if line.strip():
                    yield fi, lineno, line
            continue
        para: list[bytes] = []
        start = 0
        for lineno, line in _iter_lines(path):
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                yield fi, start, b"".join(para)
                para = []
        if para:
            yield fi, start, b"".join(para)


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
