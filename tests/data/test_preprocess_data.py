from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard
from datatest_helpers import REPO_ROOT, run_tool, write_jsonl

from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder
from megatron.data.preprocess import merge as merge_datasets
from megatron.data.preprocess import pipeline as preprocess_data
from megatron.data.preprocess import token_count as dataset_token_count
from megatron.data.preprocess.text_inputs import iter_records
from megatron.tokenizer import build_tokenizer

PREPROCESS = "tools/datasets/preprocess_data.py"


def _hf_args(bpe_files):
    return ["--tokenizer-type", "HFTokenizer", "--vocab-file", bpe_files["tokenizer_json"]]


def _documents(prefix):
    ds = MMapIndexedDataset(prefix)
    return [ds.get_document(k).tolist() for k in range(ds.num_documents)], ds


def test_cli_two_workers_two_keys(tmp_path, bpe_files, corpus_docs):
    records = [
        {"text": doc, "title": f"title {i}: {doc[:20]}"} for i, doc in enumerate(corpus_docs)
    ]
    records.insert(5, {"text": "no title here"})  # bad for one key -> skipped for both
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out" / "corpus"
    proc = run_tool(
        PREPROCESS,
        "--input",
        str(src),
        "--output-prefix",
        str(out),
        *_hf_args(bpe_files),
        "--jsonl-keys",
        "text",
        "title",
        "--append-eod",
        "--workers",
        "2",
        "--chunksize",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    tok = build_tokenizer("HFTokenizer", bpe_files["tokenizer_json"])
    good = [r for r in records if "title" in r]
    text_docs, text_ds = _documents(f"{out}_text_document")
    title_docs, _ = _documents(f"{out}_title_document")
    assert text_ds.dtype == np.uint16
    assert text_docs == [tok.tokenize(r["text"]) + [tok.eod] for r in good]
    assert title_docs == [tok.tokenize(r["title"]) + [tok.eod] for r in good]
    assert f"{len(good)} documents" in proc.stdout and "1 bad records" in proc.stdout
    assert "in.jsonl:6: missing key 'title'" in proc.stdout


def test_cli_compressed_and_text_inputs(tmp_path, bpe_files, corpus_docs):
    docs_gz, docs_zst, paras = corpus_docs[:10], corpus_docs[10:20], corpus_docs[20:25]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs_gz)
    payload = "".join(json.dumps({"text": d}) + "\n" for d in docs_zst).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    # plain text: documents are paragraphs separated by blank lines
    flat = [" ".join(p.split()) for p in paras]
    (tmp_path / "c.txt").write_text("\n\n\n".join(flat) + "\n", encoding="utf-8")
    inputs = ",".join(str(tmp_path / n) for n in ("a.jsonl.gz", "b.jsonl.zst", "c.txt"))
    out = tmp_path / "mixed"
    proc = run_tool(
        PREPROCESS,
        "--input",
        inputs,
        "--output-prefix",
        str(out),
        *_hf_args(bpe_files),
        "--workers",
        "2",
        "--append-eod",
    )
    assert proc.returncode == 0, proc.stderr
    tok = build_tokenizer("HFTokenizer", bpe_files["tokenizer_json"])
    docs, _ = _documents(f"{out}_text_document")
    assert docs == [tok.tokenize(d) + [tok.eod] for d in docs_gz + docs_zst + flat]


def test_bad_lines_are_reported_with_line_numbers(tmp_path, bpe_files, capsys):
    lines = [json.dumps({"text": "first good document"})]
    lines += ["{broken json"] * 3
    lines += [json.dumps({"other": "x"}), json.dumps({"text": 42}), json.dumps({"text": "   "})]
    lines += [json.dumps(["not", "an", "object"])] * 6
    lines += ["", json.dumps({"text": "last good document"})]
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    rc = preprocess_data.main(
        [
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "o"),
            *_hf_args(bpe_files),
            "--workers",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 documents" in out and "12 bad records" in out
    assert f"{src}:2: invalid JSON" in out
    assert f"{src}:5: missing key 'text'" in out
    assert f"{src}:6: key 'text' is a number, not a string" in out
    assert f"{src}:7: empty document in key 'text'" in out
    assert f"{src}:8: expected a JSON object, got an array" in out
    assert "bad records (first 10 of 12)" in out and "... and 2 more" in out
    assert MMapIndexedDataset(tmp_path / "o_text_document").num_documents == 2


def test_no_usable_documents_is_an_error(tmp_path, bpe_files, capsys):
    src = write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}, {"body": "b"}])
    rc = preprocess_data.main(
        ["--input", str(src), "--output-prefix", str(tmp_path / "o"), *_hf_args(bpe_files)]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: no usable documents") and f"{src}:1: missing key 'text'" in err
    assert list(tmp_path.glob("o*")) == []


def test_failure_before_finalize_leaves_no_output(tmp_path, bpe_files, corpus_docs, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in corpus_docs[:20]])

    def fail(self, index_file):
        raise KeyboardInterrupt

    monkeypatch.setattr(MMapIndexedDatasetBuilder, "finalize", fail)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data.preprocess(
            str(src),
            str(tmp_path / "out" / "c"),
            "HFTokenizer",
            bpe_files["tokenizer_json"],
            workers=2,
        )
    assert list((tmp_path / "out").iterdir()) == []


def _start_on_fifo(tmp_path, bpe_files):
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [
        sys.executable,
        PREPROCESS,
        "--input",
        str(fifo),
        "--output-prefix",
        str(tmp_path / "out" / "c"),
        *_hf_args(bpe_files),
        "--workers",
        "2",
        "--chunksize",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    writer = open(fifo, "w", encoding="utf-8")  # returns once the tool is reading its input
    for i in range(30):
        writer.write(json.dumps({"text": f"document number {i} of an endless stream"}) + "\n")
    writer.flush()
    deadline = time.time() + 30
    while not list((tmp_path / "out").glob("c_text_document.bin.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    return proc, writer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_mid_run_leaves_no_idx(tmp_path, bpe_files, sig):
    proc, writer = _start_on_fifo(tmp_path, bpe_files)
    time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(sig)
    time.sleep(0.5)
    writer.close()
    _, err = proc.communicate(timeout=60)
    out_dir = tmp_path / "out"
    assert list(out_dir.glob("*.idx")) == []
    assert not (out_dir / "c_text_document.bin").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert "interrupted by SIGTERM; partial output removed" in err
        assert "Traceback" not in err
        assert list(out_dir.iterdir()) == []
    else:
        assert proc.returncode == -signal.SIGKILL


def test_txt_modes_and_line_numbers(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first para\nstill first\n\n\nsecond\n\nthird\n")
    assert [(ln, raw) for _, ln, raw in iter_records([str(path)])] == [
        (1, b"first para\nstill first\n"),
        (5, b"second\n"),
        (7, b"third\n"),
    ]
    assert [ln for _, ln, _ in iter_records([str(path)], txt_mode="line")] == [1, 2, 5, 7]


def test_merge_and_count_tools(tmp_path, bpe_files, corpus_docs, capsys):
    for name, docs in (("a", corpus_docs[:7]), ("b", corpus_docs[7:12])):
        src = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": d} for d in docs])
        preprocess_data.preprocess(
            str(src),
            str(tmp_path / name),
            "HFTokenizer",
            bpe_files["tokenizer_json"],
            append_eod=True,
            quiet=True,
        )
    prefixes = [str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")]
    assert merge_datasets.main(["--input", *prefixes, "--output-prefix", str(tmp_path / "ab")]) == 0
    merged, _ = _documents(tmp_path / "ab")
    a, _ = _documents(prefixes[0])
    b, _ = _documents(prefixes[1])
    assert merged == a + b
    capsys.readouterr()
    assert dataset_token_count.main([*prefixes, str(tmp_path / "ab"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["documents"] for r in rows] == [7, 5, 12]
    assert rows[2]["tokens"] == rows[0]["tokens"] + rows[1]["tokens"] == sum(map(len, a + b))


def test_merge_rejects_mixed_dtypes(tmp_path, capsys):
    for name, dtype in (("u16", np.uint16), ("i32", np.int32)):
        builder = MMapIndexedDatasetBuilder(tmp_path / f"{name}.bin", dtype=dtype)
        builder.add_item([1, 2])
        builder.end_document()
        builder.finalize(tmp_path / f"{name}.idx")
    rc = merge_datasets.main(
        [
            "--input",
            str(tmp_path / "u16"),
            str(tmp_path / "i32"),
            "--output-prefix",
            str(tmp_path / "m"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot merge datasets with different dtypes" in err and "i32 (int32)" in err
    assert not list(tmp_path.glob("m*"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert dataset_token_count.main([str(tmp_path / "missing")]) == 1
    assert (
        capsys.readouterr().err == f"error: index file {tmp_path / 'missing'}.idx does not exist\n"
    )
    assert (
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "none.jsonl"),
                "--output-prefix",
                "x",
                "--tokenizer-type",
                "CharLevelTokenizer",
            ]
        )
        == 1
    )
    assert (
        capsys.readouterr().err == f"error: input file {tmp_path / 'none.jsonl'} does not exist\n"
    )
