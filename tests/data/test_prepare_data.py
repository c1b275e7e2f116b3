from __future__ import annotations

import json

from datatest_helpers import run_tool

import prepare_data
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess.corpora import pydocs_documents
from megatron.tokenizer import build_tokenizer


def test_pydocs_corpus_end_to_end(tmp_path):
    proc = run_tool(
        "prepare_data.py",
        "pydocs",
        "-d",
        str(tmp_path),
        "--max-docs",
        "25",
        "--vocab-size",
        "600",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "pydocs"
    docs = [json.loads(line)["text"] for line in open(root / "pydocs.jsonl", encoding="utf-8")]
    assert len(docs) == 25
    first = next(pydocs_documents())
    assert docs[0] == first and len(first) > 100
    tok = build_tokenizer("HFTokenizer", root / "tokenizer" / "tokenizer.json")
    assert tok.vocab_size <= 600
    ds = MMapIndexedDataset(root / "pydocs_text_document")
    assert ds.num_documents == 25
    for k, doc in enumerate(docs):
        assert ds.get_document(k).tolist() == tok.tokenize(doc) + [tok.eod]
    assert f"data_path: {root / 'pydocs_text_document'}" in proc.stdout
    assert "tokenizer_type: HFTokenizer" in proc.stdout


def test_list_names_the_corpora(capsys):
    assert prepare_data.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("pydocs", "enwik8", "tinyshakespeare"):
        assert f"  {name} " in out


def test_download_failure_is_one_clear_line(tmp_path, capsys):
    url = "http://127.0.0.1:9/enwik8.zip"  # nothing listens on the discard port
    rc = prepare_data.main(["enwik8", "-d", str(tmp_path), "--url", url, "--timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith(f"error: could not download enwik8 from {url}: ")
    assert not list((tmp_path / "enwik8").rglob("*.part"))


def test_unknown_corpus(capsys):
    assert prepare_data.main(["nope"]) == 1
    assert (
        "unknown corpus 'nope' (available: pydocs, enwik8, tinyshakespeare)"
        in capsys.readouterr().err
    )
