"""The process-pool path of preprocessing: one document at a time in worker processes.

Used for tokenizers without a batch engine (``HFGPT2Tokenizer``, ``CharLevelTokenizer``),
for ``--ftfy`` (pure Python) and with ``--tokenizer-engine processes``. Each worker builds
its own tokenizer once; ``imap`` keeps input order and :class:`Throttle` bounds the number of
records in flight.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from megatron.data.preprocess.text_inputs import BadRecord, parse_record
from megatron.tokenizer.tokenizer import AbstractTokenizer, build_tokenizer


@dataclass(frozen=True)
class EncoderOptions:
    """Everything a worker needs to turn a raw record into token arrays."""

    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None
    keys: tuple[str, ...]
    kinds: tuple[str, ...]
    append_eod: bool
    ftfy: bool
    dtype: str


class DocumentEncoder:
    """Raw record -> ``("ok", ...)`` token arrays per key, or ``("bad", ...)`` with a reason."""

    def __init__(self, options: EncoderOptions, tokenizer: AbstractTokenizer | None = None):
        self.options = options
        self.tokenizer = tokenizer or build_tokenizer(
            options.tokenizer_type, options.vocab_file, options.merge_file
        )
        import numpy as np

        self._np = np
        self.dtype = np.dtype(options.dtype)
        if options.ftfy:
            import ftfy

            self._fix = ftfy.fix_text
        else:
            self._fix = None

    def encode(self, record: tuple[int, int, bytes]) -> tuple[str, int, int, int, Any]:
        fi, lineno, raw = record
        try:
            texts = parse_record(self.options.kinds[fi], raw, self.options.keys)
            arrays = []
            for key, text in zip(self.options.keys, texts):
                if self._fix is not None:
                    text = self._fix(text)
                ids = self.tokenizer.tokenize(text)
                if not ids:
                    raise BadRecord(f"key {key!r} tokenizes to nothing")
                if self.options.append_eod:
                    ids.append(self.tokenizer.eod)
                arrays.append(self._np.asarray(ids, dtype=self.dtype))
        except BadRecord as e:
            return ("bad", fi, lineno, len(raw), str(e))
        except Exception as e:  # a tokenizer failure must not kill the run
            return ("bad", fi, lineno, len(raw), f"{type(e).__name__}: {e}")
        return ("ok", fi, lineno, len(raw), arrays)


class PoolWorker:
    """Per-process encoder of a pool worker, set once by the pool initializer."""

    encoder: ClassVar[DocumentEncoder | None] = None

    @classmethod
    def setup(cls, options: EncoderOptions) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cls.encoder = DocumentEncoder(options)

    @classmethod
    def encode(cls, record: tuple[int, int, bytes]) -> tuple[str, int, int, int, Any]:
        assert cls.encoder is not None
        return cls.encoder.encode(record)


class Throttle:
    """Caps the records in flight between the reader thread and the writer."""

    def __init__(self, limit: int):
        self._sem = threading.Semaphore(limit)
        self.stop = threading.Event()

    def wrap(self, it: Iterator[Any]) -> Iterator[Any]:
        for item in it:
            while not self._sem.acquire(timeout=0.1):
                if self.stop.is_set():
                    return
            if self.stop.is_set():
                return
            yield item

    def release(self) -> None:
        self._sem.release()
