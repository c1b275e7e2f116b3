"""Train a tokenizer on jsonl / text files.

``--type bpe`` (default) trains a byte-level BPE and writes ``tokenizer.json`` (for
``HFTokenizer``), ``vocab.json`` + ``merges.txt`` (for ``GPT2BPETokenizer``) and, with
``--tiktoken``, ``tokenizer.tiktoken`` (for ``TiktokenTokenizer``). ``--type sentencepiece``
writes ``tokenizer.model`` (for ``SPMTokenizer``). Both reserve ``<|endoftext|>`` (the
end-of-document token) and ``<|padding|>``.

    python tools/datasets/train_tokenizer.py --input data.jsonl --vocab-size 8192 \\
        --output-dir tok/ [--jsonl-keys text] [--type bpe|sentencepiece] [--max-docs N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from megatron.data.preprocess.text_inputs import InputError, expand_inputs, iter_texts
from megatron.tokenizer.tokenizer import (
    EOD_TOKEN,
    PAD_TOKEN,
    bpe_files_to_tiktoken_ranks,
    write_tiktoken_ranks,
)

SPECIAL_TOKENS = [EOD_TOKEN, PAD_TOKEN]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    tiktoken: bool = False,
) -> dict[str, str]:
    """Train a byte-level BPE; returns the written files by role."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    files = {"tokenizer_json": str(out / "tokenizer.json")}
    tok.save(files["tokenizer_json"])
    vocab, merges = tok.model.save(str(out))
    files["vocab_file"], files["merge_file"] = vocab, merges
    if tiktoken:
        files["tiktoken"] = str(out / "tokenizer.tiktoken")
        write_tiktoken_ranks(bpe_files_to_tiktoken_ranks(vocab, merges), files["tiktoken"])
    return files


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike,
    *,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> dict[str, str]:
    """Train a SentencePiece model (lines of each document are its sentences)."""
    import sentencepiece as spm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        eos_piece=EOD_TOKEN,
        pad_piece=PAD_TOKEN,
        minloglevel=2,
    )
    return {"model_file": f"{prefix}.model", "vocab_listing": f"{prefix}.vocab"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="comma-separated jsonl/txt files (.gz/.zst ok)")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="json keys to train on")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--type", choices=["bpe", "sentencepiece"], default="bpe")
    p.add_argument("--min-frequency", type=int, default=2, help="bpe: minimum pair count")
    p.add_argument("--spm-model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--tiktoken", action="store_true", help="bpe: also write tokenizer.tiktoken")
    p.add_argument("--txt-mode", choices=["paragraph", "line"], default="paragraph")
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N texts only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = [k for item in args.jsonl_keys for k in item.split(",") if k]
    try:
        if args.vocab_size < 300:
            raise InputError(f"--vocab-size {args.vocab_size} is too small (at least 300)")
        paths = expand_inputs(args.input)
        texts: Iterable[str] = iter_texts(paths, keys, args.txt_mode)
        if args.max_docs is not None:
            texts = itertools.islice(texts, args.max_docs)
        if args.type == "bpe":
            files = train_bpe(
                texts,
                args.vocab_size,
                args.output_dir,
                min_frequency=args.min_frequency,
                tiktoken=args.tiktoken,
            )
        else:
            files = train_sentencepiece(
                texts, args.vocab_size, args.output_dir, model_type=args.spm_model_type
            )
    except (InputError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for role, path in files.items():
        print(f"{role}: {path}")
    return 0
