from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from megatron.tokenizer import TokenizerError, build_tokenizer, vocab_size_with_padding
from megatron.tokenizer.tokenizer import byte_level_alphabet

SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂🙂, ∑ ∫ ≠",
    "  leading and trailing spaces  ",
    "numbers 1234567890 3.14159 1e-10",
]


def _tokenizer(kind, bpe_files, spm_file):
    if kind == "GPT2BPETokenizer":
        return build_tokenizer(kind, bpe_files["vocab_file"], bpe_files["merge_file"])
    if kind == "HFTokenizer":
        return build_tokenizer(kind, bpe_files["tokenizer_json"])
    if kind == "HFGPT2Tokenizer":
        return build_tokenizer(kind, bpe_files["vocab_file"], bpe_files["merge_file"])
    if kind == "SPMTokenizer":
        return build_tokenizer(kind, spm_file)
    if kind == "TiktokenTokenizer":
        return build_tokenizer(kind, bpe_files["tiktoken"])
    return build_tokenizer(kind)


ALL_TYPES = [
    "GPT2BPETokenizer",
    "HFTokenizer",
    "HFGPT2Tokenizer",
    "SPMTokenizer",
    "CharLevelTokenizer",
    "TiktokenTokenizer",
]


def test_bpe_ids_match_the_tokenizers_library(bpe_files, corpus_docs):
    library = Tokenizer.from_file(bpe_files["tokenizer_json"])
    gpt2 = _tokenizer("GPT2BPETokenizer", bpe_files, None)
    hf = _tokenizer("HFTokenizer", bpe_files, None)
    hf_gpt2 = _tokenizer("HFGPT2Tokenizer", bpe_files, None)
    for text in SAMPLE_TEXTS + corpus_docs[:10]:
        want = library.encode(text).ids
        assert len(want) > 0
        assert gpt2.tokenize(text) == want
        assert hf.tokenize(text) == want
        assert hf_gpt2.tokenize(text) == want
    # a trained BPE compresses: fewer tokens than bytes on real text
    doc = corpus_docs[0]
    assert len(gpt2.tokenize(doc)) < len(doc.encode()) / 2


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_roundtrip_and_special_tokens(kind, bpe_files, spm_file):
    tok = _tokenizer(kind, bpe_files, spm_file)
    assert tok.name == kind
    for text in SAMPLE_TEXTS:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size
    assert tok.eod not in tok.tokenize(SAMPLE_TEXTS[0])


@pytest.mark.parametrize(
    "kind", ["GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer"]
)
def test_vocab_based_special_tokens(kind, bpe_files, spm_file):
    tok = _tokenizer(kind, bpe_files, spm_file)
    vocab = tok.vocab
    assert len(vocab) == tok.vocab_size
    assert tok.eod == vocab["<|endoftext|>"]
    assert tok.pad == vocab["<|padding|>"]
    assert tok.inv_vocab[tok.eod] == "<|endoftext|>"


def test_bpe_vocab_size_matches_the_files(bpe_files):
    with open(bpe_files["vocab_file"], encoding="utf-8") as f:
        vocab = json.load(f)
    assert _tokenizer("GPT2BPETokenizer", bpe_files, None).vocab_size == len(vocab) == 1200


def test_char_level_tokenizer():
    tok = build_tokenizer("CharLevelTokenizer")
    assert tok.vocab_size == 512 and tok.eod == 0 and tok.pad == 0
    assert tok.tokenize("Aé") == list("Aé".encode())
    assert tok.detokenize([65, 0, 66]) == "AB"


def test_tiktoken_segments_like_the_bpe_it_was_exported_from(bpe_files, corpus_docs):
    bpe = _tokenizer("GPT2BPETokenizer", bpe_files, None)
    tik = _tokenizer("TiktokenTokenizer", bpe_files, None)
    alphabet = byte_level_alphabet()
    inv = bpe.inv_vocab
    for text in SAMPLE_TEXTS + corpus_docs[:5]:
        bpe_pieces = [bytes(alphabet[c] for c in inv[i]) for i in bpe.tokenize(text)]
        tik_pieces = [tik._enc.decode_single_token_bytes(i) for i in tik.tokenize(text)]
        assert tik_pieces == bpe_pieces
    # eod is the special token added right after the mergeable ranks
    assert tik.eod == tik.vocab_size - 1
    assert tik.detokenize([tik.eod]) == "<|endoftext|>"
    # special-token text inside a document stays ordinary text
    assert tik.eod not in tik.tokenize("a <|endoftext|> b")


def test_byte_level_alphabet_is_a_bijection():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == 65 and alphabet["Ġ"] == 32


def test_errors_name_the_problem(tmp_path, bpe_files):
    with pytest.raises(TokenizerError, match="unknown tokenizer_type 'NoSuchTokenizer'"):
        build_tokenizer("NoSuchTokenizer")
    missing = tmp_path / "missing.json"
    with pytest.raises(TokenizerError, match=f"HFTokenizer: .*{missing} does not exist"):
        build_tokenizer("HFTokenizer", missing)
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer needs a merge_file"):
        build_tokenizer("GPT2BPETokenizer", bpe_files["vocab_file"])
    with pytest.raises(TokenizerError, match="HFGPT2Tokenizer needs a local vocab_file"):
        build_tokenizer("HFGPT2Tokenizer")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    with pytest.raises(TokenizerError, match=f"cannot load {garbage}"):
        build_tokenizer("HFTokenizer", garbage)
    bad_tik = tmp_path / "bad.tiktoken"
    bad_tik.write_text("QQ== 0\n")
    with pytest.raises(TokenizerError, match="lacks 255 single-byte tokens"):
        build_tokenizer("TiktokenTokenizer", bad_tik)


def test_type_names_are_case_insensitive(bpe_files):
    tok = build_tokenizer("hftokenizer", bpe_files["tokenizer_json"])
    assert tok.name == "HFTokenizer"


def test_vocab_size_with_padding():
    assert vocab_size_with_padding(50257, 128, 1) == 50304
    assert vocab_size_with_padding(50257, 128, 2) == 50432
    assert vocab_size_with_padding(512, 128, 1) == 512
