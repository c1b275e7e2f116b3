"""Preprocessing under signals and with damaged inputs: a stop is never a bad record, a killed
run's temporary files are cleaned up by the next run, a damaged compressed input is one line
naming the file."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import pytest
import zstandard
from datatest_helpers import REPO_ROOT, run_tool

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, remove_stale_temporaries
from megatron.data.preprocess.pipeline import Interrupted, _BatchWork
from megatron.data.preprocess.process_pool import DocumentEncoder, EncoderOptions

PREPROCESS = "tools/datasets/preprocess_data.py"
CHAR = ["--tokenizer-type", "CharLevelTokenizer"]


class _StoppedTokenizer:
    """A tokenizer interrupted by a signal handler while it works (what Ctrl-C does to the
    single-process encoder: the handler raises in whatever code runs)."""

    eod = 0

    def tokenize(self, text: str) -> list[int]:
        raise Interrupted("SIGINT")

    def encode(self, texts: list[str]) -> list[list[int]]:
        raise Interrupted("SIGINT")


def test_a_stop_during_encoding_is_not_a_bad_record():
    options = EncoderOptions("CharLevelTokenizer", None, None, ("text",), ("jsonl",), True,
                             False, "uint16")
    encoder = DocumentEncoder(options, _StoppedTokenizer())  # type: ignore[arg-type]
    with pytest.raises(Interrupted):
        encoder.encode((0, 1, json.dumps({"text": "hello"}).encode()))
    work = _BatchWork(_StoppedTokenizer(), ("jsonl",), ("text",), 0)  # type: ignore[arg-type]
    with pytest.raises(Interrupted):
        work([(0, 1, json.dumps({"text": "hello"}).encode())])


def _corpus(n: int = 3000) -> bytes:
    return "\n".join(json.dumps({"text": f"document {i} " * 30}) for i in range(n)).encode()


def test_sigint_with_one_worker_stops_with_one_line_and_no_output(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_bytes(_corpus(40000))
    out = tmp_path / "out" / "c"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, PREPROCESS, "--input", str(src), "--output-prefix",
                             str(out), *CHAR, "--workers", "1", "--log-interval", "1000"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 60
    while not list(out.parent.glob("*.tmp")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT; partial output removed" in err
    assert "Traceback" not in err and "bad record" not in err
    assert list(out.parent.iterdir()) == []


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(tmp_path, capsys):
    bin_path = tmp_path / "c_text_document.bin"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f"c_text_document.bin.{dead.pid}.tmp",
             tmp_path / f"c_text_document.idx.{dead.pid}.tmp"]
    live = tmp_path / f"c_text_document.bin.{os.getppid()}.tmp"  # a writer still running
    for path in (*stale, live):
        path.write_bytes(b"x" * 1000)
    removed = remove_stale_temporaries(str(bin_path))
    assert sorted(removed) == sorted(map(str, stale))
    assert live.exists() and not any(p.exists() for p in stale)
    assert f"left by an interrupted run (process {dead.pid} is gone)" in capsys.readouterr().err
    stale[0].write_bytes(b"x")
    with MMapIndexedDatasetBuilder(bin_path, dtype="uint16") as builder:  # a new writer cleans
        builder.add_item([1, 2, 3])
        builder.end_document()
        builder.finalize(str(tmp_path / "c_text_document.idx"))
    assert not stale[0].exists()


@pytest.mark.parametrize("name,damage", [
    ("in.jsonl.gz", "truncate"), ("in.jsonl.gz", "flip"), ("in.jsonl.zst", "truncate"),
    ("in.jsonl.zst", "garbage"),
])
def test_a_damaged_compressed_input_is_one_line_naming_the_file(tmp_path, name, damage):
    raw = _corpus()
    data = gzip.compress(raw) if name.endswith(".gz") else \
        zstandard.ZstdCompressor().compress(raw)
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    else:
        data = data[:4] + b"junk" * 100
    src = tmp_path / name
    src.write_bytes(data)
    proc = run_tool(PREPROCESS, "--input", str(src), "--output-prefix", str(tmp_path / "o" / "c"),
                    *CHAR)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: input file {src}: truncated or damaged after line"), \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []
