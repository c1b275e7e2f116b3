"""Worker counts, encoding engines and shards all give the same bytes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from datatest_helpers import REPO_ROOT, write_jsonl

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import encoders
from megatron.data.preprocess import merge as merge_datasets
from megatron.data.preprocess import pipeline as preprocess_data
from megatron.data.preprocess.text_inputs import InputError, Shard, iter_records
from megatron.tokenizer import build_tokenizer


def _tokenizer_args(kind, bpe_files, spm_file):
    if kind == "HFTokenizer":
        return ["--tokenizer-type", kind, "--vocab-file", bpe_files["tokenizer_json"]]
    if kind == "GPT2BPETokenizer":
        return [
            "--tokenizer-type",
            kind,
            "--vocab-file",
            bpe_files["vocab_file"],
            "--merge-file",
            bpe_files["merge_file"],
        ]
    return ["--tokenizer-type", kind, "--vocab-file", spm_file]


def _inputs(tmp_path, corpus_docs):
    """A jsonl with a bad line, a gzipped jsonl and a paragraph text file."""
    docs = corpus_docs
    lines = [json.dumps({"text": d}) for d in docs[:25]]
    lines.insert(7, "{not json")
    a = write_jsonl(tmp_path / "a.jsonl", lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[25:40])
    paras = [" ".join(d.split()) for d in docs[40:]]
    c = tmp_path / "c.txt"
    c.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return ",".join(str(p) for p in (a, tmp_path / "b.jsonl.gz", c))


def _bytes(prefix):
    return (open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read())


@pytest.mark.parametrize("kind", ["HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer"])
def test_workers_engines_and_merged_shards_are_identical(
    tmp_path, bpe_files, spm_file, corpus_docs, kind, capsys
):
    inputs = _inputs(tmp_path, corpus_docs)
    tok = _tokenizer_args(kind, bpe_files, spm_file)
    common = ["--input", inputs, *tok, "--append-eod", "--quiet", "--batch-size", "7"]
    runs = {
        "w1": ["--workers", "1"],
        "w2": ["--workers", "2"],
        "library": ["--workers", "2", "--tokenizer-engine", "library"],
        "processes": ["--workers", "2", "--tokenizer-engine", "processes"],
    }
    for name, extra in runs.items():
        assert preprocess_data.main([*common, "--output-prefix", str(tmp_path / name), *extra]) == 0
    out = capsys.readouterr().out
    assert out.count("1 bad records") == len(runs)
    for i in range(3):
        argv = [*common, "--output-prefix", str(tmp_path / "sh"), "--num-shards", "3"]
        assert preprocess_data.main([*argv, "--shard-index", str(i), "--workers", "2"]) == 0
    shards = [str(tmp_path / f"sh-{i:05d}-of-00003_text_document") for i in range(3)]
    assert all(MMapIndexedDataset(s).num_documents > 0 for s in shards)
    merged = str(tmp_path / "merged")
    assert merge_datasets.main(["--input", *shards, "--output-prefix", merged]) == 0

    reference = _bytes(tmp_path / "w1_text_document")
    for name in ("w2", "library", "processes"):
        assert _bytes(tmp_path / f"{name}_text_document") == reference, name
    assert _bytes(merged) == reference
    # and the content is the tokenizer's own encoding
    ds = MMapIndexedDataset(tmp_path / "w1_text_document")
    tokenizer = build_tokenizer(*[a for a in tok[1::2]])
    assert ds.get_document(0).tolist() == tokenizer.tokenize(corpus_docs[0]) + [tokenizer.eod]
    assert ds.num_documents == len(corpus_docs)


def test_shards_of_every_layout_cover_the_records_once(tmp_path):
    para = tmp_path / "p.txt"
    para.write_text("a\nb\n\n\nc\n  \nd\ne\nf\n\ng\n" * 7)
    lines = write_jsonl(tmp_path / "l.jsonl", [{"text": f"doc {i}"} for i in range(40)])
    paths = [str(para), str(lines)]
    for mode in ("paragraph", "line"):
        whole = list(iter_records(paths, mode))
        for n in (2, 3, 7, 50):
            parts = [list(iter_records(paths, mode, Shard(i, n))) for i in range(n)]
            assert [r for p in parts for r in p] == whole, (mode, n)
    with pytest.raises(InputError, match="--shard-index 3 is outside 0..2"):
        Shard(3, 3)


def test_bad_shard_options_are_one_line(tmp_path, bpe_files, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o")]
    argv += ["--tokenizer-type", "HFTokenizer", "--vocab-file", bpe_files["tokenizer_json"]]
    assert preprocess_data.main([*argv, "--num-shards", "2", "--shard-index", "2"]) == 1
    assert capsys.readouterr().err == "error: --shard-index 2 is outside 0..1 (--num-shards 2)\n"


def test_byte_level_engine_is_used_and_refused_where_it_would_differ(tmp_path, bpe_files):
    tok = build_tokenizer("HFTokenizer", bpe_files["tokenizer_json"])
    fast, note = encoders.make_batch_encoder(tok, bpe_files["tokenizer_json"], None, 1)
    assert "tiktoken" in fast.name and note is None
    spec = json.loads(open(bpe_files["tokenizer_json"], encoding="utf-8").read())
    spec["normalizer"] = {"type": "Lowercase"}
    lowered = tmp_path / "lower.json"
    lowered.write_text(json.dumps(spec), encoding="utf-8")
    tok2 = build_tokenizer("HFTokenizer", lowered)
    slow, note = encoders.make_batch_encoder(tok2, str(lowered), None, 1)
    assert "encode_batch" in slow.name and "normalizer" in note
    text = "Mixed CASE text"
    assert slow.encode([text])[0].tolist() == tok2.tokenize(text) != tok.tokenize(text)


def test_preprocessing_does_not_import_torch():
    code = (
        "import sys, megatron.data.preprocess.pipeline, megatron.data.preprocess.encoders, "
        "megatron.data.preprocess.merge, megatron.data.preprocess.token_count; "
        "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_later_shard_reports_true_line_numbers(tmp_path, bpe_files, capsys):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(30)]
    lines[24] = "{broken"
    src = write_jsonl(tmp_path / "x.jsonl", lines)
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--num-shards", "2"]
    argv += ["--tokenizer-type", "HFTokenizer", "--vocab-file", bpe_files["tokenizer_json"]]
    assert preprocess_data.main([*argv, "--shard-index", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{src}:25: invalid JSON" in out and "1 bad records" in out
    assert MMapIndexedDataset(tmp_path / "o-00001-of-00002_text_document").num_documents == 14


def test_sentencepiece_word_engine_is_used_and_refused_where_it_would_differ(tmp_path, spm_file):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    tok = build_tokenizer("SPMTokenizer", spm_file)
    fast, note = encoders.make_batch_encoder(tok, spm_file, None, 1)
    assert "word by word" in fast.name and note is None
    texts = ["  two  spaces\tand a tab ", "x", "naïve café 日本語 🙂"]
    assert [a.tolist() for a in fast.encode(texts)] == [tok.tokenize(t) for t in texts]
    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(spm_file, "rb").read())
    proto.normalizer_spec.remove_extra_whitespaces = True  # "a  b" is now "a b"
    folded = tmp_path / "folded.model"
    folded.write_bytes(proto.SerializeToString())
    tok2 = build_tokenizer("SPMTokenizer", folded)
    slow, note = encoders.make_batch_encoder(tok2, str(folded), None, 1)
    assert "batch encode" in slow.name and "whitespace" in note
    assert [a.tolist() for a in slow.encode(texts)] == [tok2.tokenize(t) for t in texts]


def test_deepspeed_import_still_gets_the_accelerator_choice():
    """Importing megatron no longer imports torch; DS_ACCELERATOR is set when DeepSpeed loads."""
    code = (
        "import os, sys; os.environ.pop('DS_ACCELERATOR', None); import megatron; "
        "before = ('torch' in sys.modules, os.environ.get('DS_ACCELERATOR')); import deepspeed; "
        "print(before, os.environ.get('DS_ACCELERATOR'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] in ("(False, None) cpu", "(False, None) cuda")
