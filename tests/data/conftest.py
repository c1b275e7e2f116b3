"""Shared fixtures for the data-layer tests: a small real-text corpus and tokenizers trained on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
for _path in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

EXTRA_DOCS = [
    "Unicode text: héllo wörld, naïve café, 日本語のテキスト, emoji 🙂 and tabs\tinside.",
    "Numbers 12345 and 3.14159, symbols #@$%^&*() and a trailing newline\n",
]


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[k].strip() for k in sorted(topics)][:60]
    return docs + EXTRA_DOCS


@pytest.fixture(scope="session")
def bpe_files(tmp_path_factory, corpus_docs) -> dict[str, str]:
    from megatron.data.preprocess.tokenizer_training import train_bpe

    return train_bpe(corpus_docs, 1200, tmp_path_factory.mktemp("bpe"), tiktoken=True)


@pytest.fixture(scope="session")
def spm_file(tmp_path_factory, corpus_docs) -> str:
    from megatron.data.preprocess.tokenizer_training import train_sentencepiece

    return train_sentencepiece(corpus_docs, 800, tmp_path_factory.mktemp("spm"))["model_file"]
