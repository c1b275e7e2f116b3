"""Tokenizers behind one interface, all loaded from local files (nothing is downloaded).

``build_tokenizer(tokenizer_type, vocab_file=None, merge_file=None, ...)`` returns an
:class:`AbstractTokenizer` for ``tokenizer_type`` (case-insensitive):

=====================  ====================================================================
``GPT2BPETokenizer``   GPT-2 style ``vocab.json`` + ``merges.txt``; byte-level BPE run by the
                       ``tokenizers`` library. eod = ``<|endoftext|>``.
``HFTokenizer``        a ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``). eod is the
                       first of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>``;
                       the file's added tokens are matched inside text, as the library does.
``HFGPT2Tokenizer``    transformers' ``GPT2TokenizerFast`` from local ``vocab_file`` +
                       ``merge_file``, or a local directory given as ``vocab_file``.
``SPMTokenizer``       a SentencePiece ``.model`` file. eod = ``<|endoftext|>``, ``<eod>`` or
                       the model's eos piece.
``CharLevelTokenizer`` UTF-8 bytes as ids 1..255 in a vocabulary of 512 (GPT-NeoX's size);
                       eod = 0. A NUL character in text is dropped.
``TiktokenTokenizer``  a local ``.tiktoken`` file (base64 token + rank per line) run by
                       ``tiktoken``; eod = ``<|endoftext|>``, added right after the ranks.
=====================  ====================================================================

Every tokenizer exposes ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``,
``vocab_size``, ``eod``, ``pad`` (the padding token, or eod when there is none), ``name`` and,
where meaningful, ``vocab`` / ``inv_vocab``. Except for ``HFTokenizer``, special-token strings
inside text are encoded as ordinary text. ``vocab_size_with_padding`` rounds a vocabulary up for tensor parallelism.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import cached_property
from typing import Any

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<eod>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|pad|>")

# Split patterns (regular expressions) used by the tiktoken encodings.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class TokenizerError(ValueError):
    """A tokenizer cannot be built (unknown type, missing or unusable file)."""


def _require_file(path: str | os.PathLike | None, what: str, tokenizer_type: str) -> str:
    if path is None:
        raise TokenizerError(f"{tokenizer_type} needs {what}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(f"{tokenizer_type}: {what} {path} does not exist")
    return path


class AbstractTokenizer(ABC):
    """What the data pipeline and the training loop need from a tokenizer."""

    def __init__(self, name: str):
        self.name = name

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def vocab(self) -> dict[str, int]:
        raise NotImplementedError(f"{self.name} has no string vocabulary")

    @cached_property
    def inv_vocab(self) -> dict[int, str]:
        return {i: tok for tok, i in self.vocab.items()}

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    def tokenize_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    @abstractmethod
    def detokenize(self, token_ids: Iterable[int]) -> str: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @property
    def eod_id(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def backend(self) -> Any:
        """The library object doing the encoding (for batch / threaded use), or None."""
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"
        )


class _HFBackedTokenizer(AbstractTokenizer):
    """Shared logic for tokenizers wrapping a ``tokenizers.Tokenizer``."""

    def __init__(self, name: str, tokenizer: Any, source: str):
        super().__init__(name)
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._eod = next((vocab[t] for t in _EOD_CANDIDATES if t in vocab), None)
        if self._eod is None:
            raise TokenizerError(
                f"{name}: {source} has no end-of-document token (looked for {', '.join(_EOD_CANDIDATES)})"
            )
        self._pad = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), self._eod)

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Iterable[str]) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return self._tok.decode([int(t) for t in token_ids], skip_special_tokens=False)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad


class GPT2BPETokenizer(_HFBackedTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` and ``merges.txt``.

    Special tokens are not split out of text: ``"<|endoftext|>"`` inside a document is encoded
    byte by byte, as the original GPT-2 encoder does.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as e:
            raise TokenizerError(
                f"GPT2BPETokenizer: cannot load {vocab_file} / {merge_file}: {e}"
            ) from e
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        super().__init__("GPT2BPETokenizer", tok, vocab_file)


class HFTokenizer(_HFBackedTokenizer):
    """Any ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, vocab_file: str):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(vocab_file)
        except Exception as e:
            raise TokenizerError(f"HFTokenizer: cannot load {vocab_file}: {e}") from e
        super().__init__("HFTokenizer", tok, vocab_file)


def gpt2_fast_from_files(cls: Any, vocab_file: str, merge_file: str) -> Any:
    params = inspect.signature(cls.__init__).parameters
    if "vocab_file" in params:  # transformers 4.x
        return cls(vocab_file=vocab_file, merges_file=merge_file)
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merge_file, encoding="utf-8") as f:
        merges = [
            tuple(line.rstrip("\n").split(" "))
            for line in f
            if line.strip() and not line.startswith("#version")
        ]
    return cls(vocab=vocab, merges=merges)


class HFGPT2Tokenizer(AbstractTokenizer):
    """transformers' ``GPT2TokenizerFast`` from local files only."""

    def __init__(self, vocab_file: str, merge_file: str | None = None):
        super().__init__("HFGPT2Tokenizer")
        from transformers import GPT2TokenizerFast

        try:
            if os.path.isdir(vocab_file):
                tok = GPT2TokenizerFast.from_pretrained(vocab_file, local_files_only=True)
            else:
                merge_file = _require_file(merge_file, "a merge_file", self.name)
                tok = gpt2_fast_from_files(GPT2TokenizerFast, vocab_file, merge_file)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"HFGPT2Tokenizer: cannot load {vocab_file}: {e}") from e
        tok.model_max_length = 1 << 62  # documents are longer than any model context
        self._tok = tok
        vocab = tok.get_vocab()
        eod = tok.eos_token_id if tok.eos_token_id is not None else vocab.get(EOD_TOKEN)
        if eod is None:
            raise TokenizerError(f"HFGPT2Tokenizer: {vocab_file} has no {EOD_TOKEN} token")
        self._eod = int(eod)
        self._pad = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), self._eod)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return self._tok.decode([int(t) for t in token_ids])

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad


class SPMTokenizer(AbstractTokenizer):
    """A SentencePiece model."""

    def __init__(self, vocab_file: str):
        super().__init__("SPMTokenizer")
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=vocab_file)
        except Exception as e:
            raise TokenizerError(f"SPMTokenizer: cannot load {vocab_file}: {e}") from e
        sp = self._sp
        eod = next((sp.piece_to_id(t) for t in (EOD_TOKEN, "<eod>") if self._has_piece(t)), None)
        if eod is None:
            eod = sp.eos_id() if sp.eos_id() >= 0 else None
        if eod is None:
            raise TokenizerError(f"SPMTokenizer: {vocab_file} has no eos / {EOD_TOKEN} piece")
        self._eod = int(eod)
        if sp.pad_id() >= 0:
            self._pad = int(sp.pad_id())
        else:
            self._pad = next(
                (sp.piece_to_id(t) for t in _PAD_CANDIDATES if self._has_piece(t)), self._eod
            )

    @property
    def backend(self) -> Any:
        """The ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def _has_piece(self, piece: str) -> bool:
        i = self._sp.piece_to_id(piece)
        return i != self._sp.unk_id() or piece == self._sp.id_to_piece(self._sp.unk_id())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @cached_property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return self._sp.decode([int(t) for t in token_ids])

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad


class CharLevelTokenizer(AbstractTokenizer):
    """UTF-8 bytes as token ids; id 0 is the end-of-document token."""

    def __init__(self, vocab_size: int = 512):
        super().__init__("CharLevelTokenizer")
        if vocab_size < 256:
            raise TokenizerError(f"CharLevelTokenizer needs vocab_size >= 256, got {vocab_size}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return [b for b in text.encode("utf-8") if b]

    def detokenize(self, token_ids: Iterable[int]) -> str:
        data = bytes(int(t) for t in token_ids if 0 < int(t) < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def eod(self) -> int:
        return 0


def _tiktoken_pattern(path: str) -> str:
    base = os.path.basename(path).lower()
    if "o200k" in base:
        return O200K_PATTERN
    if "cl100k" in base:
        return CL100K_PATTERN
    return GPT2_PATTERN


class TiktokenTokenizer(AbstractTokenizer):
    """A tiktoken ``Encoding`` built from a local ``.tiktoken`` rank file.

    The split pattern is ``pattern`` when given; otherwise cl100k's or o200k's when the file
    name says so, and GPT-2's for anything else (files exported from byte-level BPEs).
    """

    def __init__(self, vocab_file: str, pattern: str | None = None):
        super().__init__("TiktokenTokenizer")
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        with open(vocab_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            # The expected hash keeps tiktoken's path-keyed cache from serving a stale copy.
            ranks = load_tiktoken_bpe(vocab_file, expected_hash=digest)
        except Exception as e:
            raise TokenizerError(f"TiktokenTokenizer: cannot load {vocab_file}: {e}") from e
        if not ranks:
            raise TokenizerError(f"TiktokenTokenizer: {vocab_file} has no tokens")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(
                f"TiktokenTokenizer: {vocab_file} lacks {len(missing)} single-byte tokens "
                f"(first: byte {missing[0]})"
            )
        self._eod = max(ranks.values()) + 1
        self._enc = tiktoken.Encoding(
            name=os.path.basename(vocab_file),
            pat_str=pattern or _tiktoken_pattern(vocab_file),
            mergeable_ranks=ranks,
            special_tokens={EOD_TOKEN: self._eod},
        )

    @property
    def backend(self) -> Any:
        """The ``tiktoken.Encoding``."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @cached_property
    def vocab(self) -> dict[str, int]:
        # Token strings are their bytes decoded as latin-1 (one char per byte, reversible).
        out = {}
        for i in range(self._eod):
            try:
                out[self._enc.decode_single_token_bytes(i).decode("latin-1")] = i
            except KeyError:
                continue
        out[EOD_TOKEN] = self._eod
        return out

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def detokenize(self, token_ids: Iterable[int]) -> str:
        return self._enc.decode([int(t) for t in token_ids])

    @property
    def eod(self) -> int:
        return self._eod


TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "HFTokenizer",
    "HFGPT2Tokenizer",
    "SPMTokenizer",
    "CharLevelTokenizer",
    "TiktokenTokenizer",
)


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
    *,
    tiktoken_pattern: str | None = None,
) -> AbstractTokenizer:
    """Build the tokenizer named by ``tokenizer_type`` from local files."""
    if not tokenizer_type:
        raise TokenizerError(
            f"tokenizer_type is not set (choose one of {', '.join(TOKENIZER_TYPES)})"
        )
    kind = str(tokenizer_type).lower()
    if kind == "gpt2bpetokenizer":
        vocab = _require_file(vocab_file, "a vocab_file (vocab.json)", "GPT2BPETokenizer")
        merges = _require_file(merge_file, "a merge_file (merges.txt)", "GPT2BPETokenizer")
        return GPT2BPETokenizer(vocab, merges)
    if kind == "hftokenizer":
        return HFTokenizer(
            _require_file(vocab_file, "a vocab_file (tokenizer.json)", "HFTokenizer")
        )
    if kind == "hfgpt2tokenizer":
        vocab = _require_file(
            vocab_file,
            "a local vocab_file (vocab.json or a tokenizer directory)",
            "HFGPT2Tokenizer",
        )
        merges = os.fspath(merge_file) if merge_file is not None else None
        return HFGPT2Tokenizer(vocab, merges)
    if kind in ("spmtokenizer", "sentencepiecetokenizer"):
        return SPMTokenizer(_require_file(vocab_file, "a vocab_file (.model)", "SPMTokenizer"))
    if kind == "charleveltokenizer":
        return CharLevelTokenizer()
    if kind == "tiktokentokenizer":
        path = _require_file(vocab_file, "a vocab_file (.tiktoken)", "TiktokenTokenizer")
        return TiktokenTokenizer(path, pattern=tiktoken_pattern)
    raise TokenizerError(
        f"unknown tokenizer_type {tokenizer_type!r} (choose one of {', '.join(TOKENIZER_TYPES)})"
    )


def vocab_size_with_padding(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, model_parallel_size: int = 1
) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * mp_size``."""
    multiple = max(1, int(make_vocab_size_divisible_by)) * max(1, int(model_parallel_size))
    return -(-int(vocab_size) // multiple) * multiple


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``{token bytes: rank}`` in the ``.tiktoken`` text format."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE printable-character alphabet: ``{char: byte value}``.

    Printable Latin-1 bytes map to themselves; the remaining bytes map, in order, to code
    points 256, 257, ... so every byte has a visible one-character name.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def bpe_files_to_tiktoken_ranks(vocab_file: str, merge_file: str) -> dict[bytes, int]:
    """Convert a byte-level BPE (``vocab.json`` + ``merges.txt``) to tiktoken ranks.

    Single bytes get ranks 0..255 and every merge result the next rank in merge order, which
    is the priority order tiktoken applies.
    """
    alphabet = byte_level_alphabet()

    def to_bytes(token: str) -> bytes:
        return bytes(alphabet[c] for c in token)

    with open(vocab_file, encoding="utf-8") as f:
        json.load(f)  # validates the pair; the ranks come from the merge order
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    with open(merge_file, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            left, right = line.split(" ")
            merged = to_bytes(left) + to_bytes(right)
            if merged not in ranks:
                ranks[merged] = len(ranks)
    return ranks
