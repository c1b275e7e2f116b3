"""Batch encoders: a list of texts in, one token-id array per text out, in order.

Preprocessing hands whole batches to the tokenizer library so that the per-document Python
work is a loop over results, and parallelism comes from the library's own threads (which
run without the GIL) instead of worker processes that each import and load everything:

=====================  ===================================================================
tokenizer              engine
=====================  ===================================================================
byte-level BPE         ``tiktoken`` run on the tokenizer's own vocabulary and merges
(``HFTokenizer`` of a  (``bpe``): the same pre-tokenization pattern and merge order, several
GPT-2 style            times faster than the ``tokenizers`` library; ids are mapped back to
``tokenizer.json``,    the tokenizer's ids. Used when the file has exactly the GPT-2 shape
``GPT2BPETokenizer``)  (no normalizer, ``ByteLevel`` pre-tokenizer without prefix space, plain
                       BPE, unique merges) and a probe text encodes identically both ways.
other ``HFTokenizer``  ``tokenizers``' ``encode_batch`` on its Rust thread pool (``library``).
``SPMTokenizer``       SentencePiece BPE with identity normalization (the common case, e.g.
                       LLaMA's): each distinct space-separated word is encoded once and
                       remembered (``words``), exact when no piece can span two words (checked
                       on the model's pieces and normalizer, and on a probe text). Otherwise
                       SentencePiece's batch ``encode`` with ``num_threads``.
``TiktokenTokenizer``  tiktoken's batch encoding with ``num_threads``.
=====================  ===================================================================

``engine="library"`` skips the ``bpe`` and ``words`` engines; ``engine="processes"`` (and tokenizers
without a batch engine, and ``--ftfy``, which is pure Python) use worker processes that
encode one document at a time instead (see ``pipeline``).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron.data.preprocess.pipeline import ENGINES
from megatron.tokenizer.tokenizer import (
    GPT2_PATTERN,
    AbstractTokenizer,
    GPT2BPETokenizer,
    HFTokenizer,
    SPMTokenizer,
    TiktokenTokenizer,
    byte_level_alphabet,
)

# Contractions, digits, punctuation runs, whitespace runs, accents, CJK, emoji, a special token.
PROBE_TEXT = (
    "It's what they'll say: we'd ALREADY tried, haven't we?  Numbers 1234567 and 3.14159,\n"
    "\ttabs\t\tand   runs of    spaces \n\n\n  trailing  \r\n(parens) [brackets] {braces} "
    "#@$%^&*_+=|\\/<>~` naïve café, Übermaß, ﬁne, 日本語のテキスト, 한국어, русский, emoji 🙂👍🏽, "
    "<|endoftext|> inside text, \u00a0nbsp\u2009thin\u3000ideographic \u200bzwsp end."
)


class FastPathUnavailable(ValueError):
    """The tokenizer file does not have the shape the ``bpe`` engine reproduces."""


@dataclass
class BatchEncoder:
    """``encode(texts) -> [ids array per text]`` and a description for the summary."""

    name: str
    encode: Callable[[list[str]], list[np.ndarray]]


def _as_arrays(lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int64) for ids in lists]


def _library_hf(tokenizer: AbstractTokenizer, threads: int) -> BatchEncoder:
    # The Rust thread pool reads its size when first used in the process.
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(threads))
    tok = tokenizer.backend
    batch = getattr(tok, "encode_batch_fast", None) or tok.encode_batch

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in batch(texts, add_special_tokens=False)]

    return BatchEncoder(f"tokenizers encode_batch ({threads} threads)", encode)


def _library_spm(tokenizer: AbstractTokenizer, threads: int) -> BatchEncoder:
    sp = tokenizer.backend

    def encode(texts: list[str]) -> list[np.ndarray]:
        return _as_arrays(sp.encode(texts, out_type=int, num_threads=threads))

    return BatchEncoder(f"sentencepiece batch encode ({threads} threads)", encode)


SPACE = "\u2581"  # SentencePiece's visible space


def _spm_word_cache_refusal(sp: Any) -> str | None:
    """Why a SentencePiece model cannot be encoded word by word, or None when it can.

    Word by word is exact when the normalized text is the input with spaces made visible
    plus one leading visible space (identity normalization, dummy prefix, no whitespace
    folding), the model is BPE, and no piece holds a visible space after its first
    character: then no merge can join two space-separated words, and merges inside one word
    do not depend on the others.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:
        return "the sentencepiece model protobuf module is unavailable"
    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != model_pb2.TrainerSpec.BPE:
        return "the model is not BPE"
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        return "its normalization maps characters or whitespace"
    if not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        return "it does not mark word starts with a visible space"
    user_defined = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    for piece in proto.pieces:
        if piece.type == user_defined or SPACE in piece.piece[1:]:
            return f"piece {piece.piece!r} can span words"
    if sp.piece_to_id(SPACE) == sp.unk_id():
        return "it has no piece for a lone space"
    return None


def _spm_words(tokenizer: AbstractTokenizer, threads: int, max_words: int) -> BatchEncoder:
    """SentencePiece BPE, each distinct space-separated word encoded once and remembered."""
    sp = tokenizer.backend
    cache: dict[str, list[int]] = {"": [sp.piece_to_id(SPACE)]}
    chain = itertools.chain.from_iterable

    def encode(texts: list[str]) -> list[np.ndarray]:
        words = [t.split(" ") for t in texts]
        missing = list(set(chain(words)).difference(cache))
        if missing:
            if len(cache) + len(missing) > max_words:
                cache.clear()
                cache[""] = [sp.piece_to_id(SPACE)]
            for word, ids in zip(missing, sp.encode(missing, out_type=int, num_threads=threads)):
                cache[word] = ids
        get = cache.__getitem__
        return [np.fromiter(chain(map(get, ws)), dtype=np.int64) for ws in words]

    return BatchEncoder(f"sentencepiece BPE, word by word ({threads} threads)", encode)


def _library_tiktoken(tokenizer: AbstractTokenizer, threads: int) -> BatchEncoder:
    enc = tokenizer.backend

    def encode(texts: list[str]) -> list[np.ndarray]:
        if threads == 1:
            return _as_arrays([enc.encode_ordinary(t) for t in texts])
        return _as_arrays(enc.encode_ordinary_batch(texts, num_threads=threads))

    return BatchEncoder(f"tiktoken ({threads} threads)", encode)


# ---------------------------------------------------------------------------------------------
# The ``bpe`` engine: byte-level BPE through tiktoken, ids mapped back to the tokenizer's ids.


def _merge_pairs(merges: list[Any], source: str) -> tuple[list[str], list[str]]:
    """Left and right parts of every merge (``"a b"`` strings or ``[a, b]`` lists)."""
    if merges and isinstance(merges[0], str):
        parts = [m.split(" ") for m in merges]
    else:
        parts = [list(m) for m in merges]
    if any(len(pair) != 2 for pair in parts):
        bad = next(m for m, pair in zip(merges, parts) if len(pair) != 2)
        raise FastPathUnavailable(f"{source}: merge {bad!r} is not a pair")
    if not parts:
        return [], []
    lefts, rights = zip(*parts)
    return list(lefts), list(rights)


@dataclass
class _ByteLevelBPE:
    ranks: dict[bytes, int]
    rank_to_id: np.ndarray
    specials: dict[str, int]  # text -> rank (mapped to the tokenizer id by rank_to_id)


def _byte_level_tables(
    vocab: dict[str, int],
    merges: tuple[list[str], list[str]],
    added: dict[str, int],
    source: str,
) -> _ByteLevelBPE:
    lefts, rights = merges
    alphabet = byte_level_alphabet()
    char_of_byte = {b: c for c, b in alphabet.items()}
    missing = [b for b in range(256) if char_of_byte[b] not in vocab]
    if missing:
        raise FastPathUnavailable(f"{source}: byte {missing[0]} has no token")
    merged = [left + right for left, right in zip(lefts, rights)]
    if not vocab.keys() >= set(lefts).union(rights, merged):
        bad = next(i for i, m in enumerate(merged) if not {lefts[i], rights[i], m} <= vocab.keys())
        raise FastPathUnavailable(f"{source}: merge {lefts[bad]} {rights[bad]} leaves the vocabulary")
    # token text -> its bytes: each byte-level character stands for one byte (latin-1 code);
    # all merged tokens are converted in one pass, joined by a character no token contains
    to_latin1 = str.maketrans({c: chr(b) for c, b in alphabet.items()})
    try:
        joined = "\x00".join(merged).translate(to_latin1).encode("latin-1")
    except UnicodeEncodeError:
        raise FastPathUnavailable(f"{source}: a merged token is not byte-level") from None
    keys = joined.split(b"\x00") if merged else []
    if len(keys) != len(merged) or "\x00" in alphabet:
        raise FastPathUnavailable(f"{source}: a merged token is not byte-level")
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update(zip(keys, range(256, 256 + len(keys))))
    if len(ranks) != 256 + len(keys):
        raise FastPathUnavailable(f"{source}: one token is produced by two merges")
    ids = [vocab[char_of_byte[b]] for b in range(256)] + [vocab[m] for m in merged]
    specials = {}
    for text, token_id in added.items():
        specials[text] = len(ids)
        ids.append(token_id)
    return _ByteLevelBPE(ranks, np.asarray(ids, dtype=np.int64), specials)


def _tables_from_tokenizer_json(path: str) -> _ByteLevelBPE:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    why = None
    if spec.get("normalizer") is not None:
        why = "it has a normalizer"
    elif pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get(
        "use_regex", True
    ):
        why = "its pre-tokenizer is not ByteLevel without prefix space"
    elif model.get("type") != "BPE":
        why = "its model is not BPE"
    elif model.get("dropout") or model.get("continuing_subword_prefix") or model.get(
        "end_of_word_suffix"
    ):
        why = "its BPE uses dropout or word affixes"
    elif model.get("byte_fallback") or model.get("ignore_merges"):
        why = "its BPE uses byte_fallback or ignore_merges"
    if why:
        raise FastPathUnavailable(f"{path}: {why}")
    added = {}
    for tok in spec.get("added_tokens") or []:
        if tok.get("single_word") or tok.get("lstrip") or tok.get("rstrip"):
            raise FastPathUnavailable(f"{path}: added token {tok['content']!r} has match rules")
        added[tok["content"]] = int(tok["id"])
    texts = list(added)
    if any(a != b and a in b for a in texts for b in texts):
        raise FastPathUnavailable(f"{path}: one added token contains another")
    merges = _merge_pairs(model.get("merges") or [], path)
    return _byte_level_tables(model.get("vocab") or {}, merges, added, path)


def _tables_from_gpt2_files(vocab_file: str, merge_file: str) -> _ByteLevelBPE:
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merge_file, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    return _byte_level_tables(vocab, _merge_pairs(merges, merge_file), {}, merge_file)


def _bpe_engine(tables: _ByteLevelBPE, threads: int) -> BatchEncoder:
    import tiktoken

    enc = tiktoken.Encoding(
        name="byte-level-bpe",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=tables.ranks,
        special_tokens=tables.specials,
    )
    table = tables.rank_to_id
    if tables.specials:

        def one(text: str) -> list[int]:
            return enc.encode(text, allowed_special="all")

        def many(texts: list[str]) -> list[list[int]]:
            return enc.encode_batch(texts, num_threads=threads, allowed_special="all")
    else:
        one = enc.encode_ordinary

        def many(texts: list[str]) -> list[list[int]]:
            return enc.encode_ordinary_batch(texts, num_threads=threads)

    def encode(texts: list[str]) -> list[np.ndarray]:
        lists = [one(t) for t in texts] if threads == 1 else many(texts)
        return [table[np.asarray(ids, dtype=np.int64)] for ids in lists]

    return BatchEncoder(f"byte-level BPE via tiktoken ({threads} threads)", encode)


def make_batch_encoder(
    tokenizer: AbstractTokenizer,
    vocab_file: str | None,
    merge_file: str | None,
    threads: int,
    engine: str = "auto",
) -> tuple[BatchEncoder | None, str | None]:
    """The fastest in-process batch encoder for ``tokenizer``, or None (use worker processes).

    Returns ``(encoder, note)``; the note says why the ``bpe`` engine was not used, if it
    was considered and refused.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    threads = max(1, int(threads))
    note = None
    if engine == "processes":
        return None, None
    if isinstance(tokenizer, (HFTokenizer, GPT2BPETokenizer)):
        if engine == "auto":
            try:
                if isinstance(tokenizer, HFTokenizer):
                    tables = _tables_from_tokenizer_json(str(vocab_file))
                else:
                    tables = _tables_from_gpt2_files(str(vocab_file), str(merge_file))
                fast = _bpe_engine(tables, threads)
                want = tokenizer.tokenize(PROBE_TEXT)
                if fast.encode([PROBE_TEXT])[0].tolist() == want:
                    return fast, None
                note = "the byte-level BPE engine disagrees with the tokenizer on a probe text"
            except FastPathUnavailable as e:
                note = f"byte-level BPE engine not used: {e}"
            except ImportError:
                note = "byte-level BPE engine not used: tiktoken is not installed"
        return _library_hf(tokenizer, threads), note
    if isinstance(tokenizer, SPMTokenizer):
        library = _library_spm(tokenizer, threads)
        if engine != "auto":
            return library, None
        why = _spm_word_cache_refusal(tokenizer.backend)
        if why is None:
            words = _spm_words(tokenizer, threads, max_words=1 << 20)
            probe = [PROBE_TEXT, " " + PROBE_TEXT + "  "]
            got = [a.tolist() for a in words.encode(probe)]
            if got == [a.tolist() for a in library.encode(probe)]:
                return words, None
            why = "word-by-word encoding disagrees with the model on a probe text"
        return library, f"word-by-word SentencePiece engine not used: {why}"
    if isinstance(tokenizer, TiktokenTokenizer):
        return _library_tiktoken(tokenizer, threads), None
    return None, None
