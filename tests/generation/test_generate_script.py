"""generate.py: the three modes, outputs, TP=2 and pipeline checkpoints, errors.

The worker's ``main`` runs in gloo ranks started by ``run_distributed`` (as deepy.py's ranks
would run it); one run goes through the ``generate.py`` script for the exit status.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_helpers import read_jsonl, run_script, tiny_checkpoint  # noqa: E402

from megatron.parallel import ParallelState  # noqa: E402
from megatron.text_generation import SamplingParams, TokenGenerator  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

PROMPTS = ["def add(a, b):", "import os", "", "The quick brown fox"]


def _main(rank, world, argv, stdin_text):
    from megatron.text_generation.runner import main

    out = io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin_text if rank == 0 else ""), stdout=out)
    return code, out.getvalue()


def expected_records(model, prompts: list[str], params: SamplingParams, steps: int, seed: int):
    tok = build_tokenizer("CharLevelTokenizer")
    gen = TokenGenerator(model, ParallelState.single(), eod=0, vocab_size=512, seed=seed)
    return [gen.generate(tok.tokenize(p), params, steps) for p in prompts]


@pytest.mark.distributed
def test_input_file_mode_writes_one_json_line_per_prompt(tmp_path):
    config, _, model = tiny_checkpoint(tmp_path, tp=2)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out_file = tmp_path / "samples.jsonl"
    argv = [str(config), "--text_gen_type", "input-file", "--sample_input_file",
            str(tmp_path / "prompts.txt"), "--sample_output_file", str(out_file),
            "--maximum_tokens", "9", "--temperature", "0.7", "--top_k", "50", "--top_p", "0.9"]
    results = run_distributed(_main, 2, argv, "")
    assert [code for code, _ in results] == [0, 0]
    records = read_jsonl(out_file)
    assert [r["context"] for r in records] == PROMPTS
    expected = expected_records(model, PROMPTS, SamplingParams(0.7, 50, 0.9), 9, seed=7)
    for record, want in zip(records, expected):
        assert record["tokens"] == want.tokens
        assert record["text"] == build_tokenizer("CharLevelTokenizer").detokenize(want.tokens)
        assert record["length"] == len(want.tokens) <= 9
        assert record["stop_reason"] == want.stop_reason
    assert records[0]["context_tokens"] == [ord(c) for c in PROMPTS[0]]
    assert "wrote 4 samples" in results[0][1] and results[1][1] == ""


@pytest.mark.distributed
def test_unconditional_and_interactive_modes(tmp_path):
    config, _, model = tiny_checkpoint(tmp_path, seed=1)
    out_file = tmp_path / "uncond.jsonl"
    argv = [str(config), "--text_gen_type", "unconditional", "--num_samples", "3",
            "--sample_output_file", str(out_file), "--maximum_tokens", "6",
            "--temperature", "1.0", "--return_logits", "true"]
    (code, _), = run_distributed(_main, 1, argv, "")
    records = read_jsonl(out_file)
    expected = expected_records(model, ["", "", ""], SamplingParams(1.0), 6, seed=7)
    assert code == 0 and [r["tokens"] for r in records] == [e.tokens for e in expected]
    assert all(r["context"] == "" and len(r["logits"]) == r["length"] for r in records)
    assert len({tuple(r["tokens"]) for r in records}) > 1  # one stream, different samples

    argv = [str(config), "--text_gen_type", "interactive", "--maximum_tokens", "5",
            "--temperature", "0"]
    results = run_distributed(_main, 2, argv + ["--model_parallel_size", "2"],
                              "hello\nworld\n")
    greedy = expected_records(model, ["hello", "world"], SamplingParams(), 5, seed=7)
    tok = build_tokenizer("CharLevelTokenizer")
    lines = results[0][1].splitlines()
    assert lines[-2:] == [tok.detokenize(g.tokens) for g in greedy]
    assert results[1][1] == ""


@pytest.mark.distributed
def test_pipeline_checkpoint_generates_with_the_plain_model(tmp_path):
    config, _, model = tiny_checkpoint(tmp_path, pp=2, seed=2, no_weight_tying=False)
    (tmp_path / "p.txt").write_text("x = 1\n")
    out_file = tmp_path / "o.jsonl"
    argv = [str(config), "--text_gen_type", "input-file", "--sample_input_file",
            str(tmp_path / "p.txt"), "--sample_output_file", str(out_file),
            "--maximum_tokens", "7", "--temperature", "0", "--recompute", "true"]
    results = run_distributed(_main, 2, argv, "")
    assert [code for code, _ in results] == [0, 0]
    (record,) = read_jsonl(out_file)
    (want,) = expected_records(model, ["x = 1"], SamplingParams(), 7, seed=7)
    assert record["tokens"] == want.tokens


def test_script_errors_are_one_line(tmp_path):
    from generation_helpers import resolved

    from megatron.checkpoint import CheckpointError
    from megatron.text_generation import load_inference_model

    config, ckpt, _ = tiny_checkpoint(tmp_path)
    proc = run_script("generate.py", config, "--load", tmp_path / "missing")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error (rank 0): {tmp_path / 'missing'}: checkpoint directory not found"
    wide = resolved({**yaml.safe_load(config.read_text()), "hidden_size": 64})
    with pytest.raises(CheckpointError, match=r"embed.word_embeddings.weight has shape \[512, "
                       r"32\], the config builds \[512, 64\] \(config/architecture mismatch\)"):
        load_inference_model(wide, ParallelState.single(), torch.device("cpu"))
    narrow = resolved({**yaml.safe_load(config.read_text()), "norm": "layernorm"})
    with pytest.raises(CheckpointError, match="missing.*input_layernorm.bias"):
        load_inference_model(narrow, ParallelState.single(), torch.device("cpu"))
