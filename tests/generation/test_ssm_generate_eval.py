"""Mamba, RWKV and gMLP layers through generate.py and the evaluation adapter: the outputs are
the model's own (cached-state decoding and log-probabilities of the whole sequence agree)."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_helpers import MODEL, read_jsonl, tiny_checkpoint  # noqa: E402

from megatron.evaluation.adapter import NeoXEvalAdapter  # noqa: E402
from megatron.parallel import ParallelState  # noqa: E402
from megatron.text_generation import SamplingParams, TokenGenerator  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402

TOK = build_tokenizer("CharLevelTokenizer")
SSM = {**MODEL, "num_layers": 4, "pos_emb": "none",
       "attention_config": [[["mamba", "rwkv", "gmlp", "global"], 4]]}
PROMPTS = ["def add(a, b):", "The quick", ""]


@dataclass
class Request:
    args: tuple


def _main(rank, world, argv):
    from megatron.text_generation.runner import main

    return main(argv, stdin=io.StringIO(""), stdout=io.StringIO())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ssm"), **SSM)


@pytest.mark.distributed
def test_generate_script_samples_the_ssm_model(checkpoint, tmp_path):
    config, _, model = checkpoint
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "samples.jsonl"
    argv = [str(config), "--text_gen_type", "input-file", "--sample_input_file",
            str(tmp_path / "prompts.txt"), "--sample_output_file", str(out),
            "--maximum_tokens", "8", "--temperature", "0.8", "--top_k", "20"]
    assert run_distributed(_main, 1, argv) == [0]
    gen = TokenGenerator(model, ParallelState.single(), eod=0, vocab_size=512, seed=7)
    records = read_jsonl(out)
    assert [r["context"] for r in records] == PROMPTS
    for record, prompt in zip(records, PROMPTS):
        want = gen.generate(TOK.tokenize(prompt), SamplingParams(0.8, 20, 0.0), 8)
        assert record["tokens"] == want.tokens


@torch.no_grad()
def test_eval_adapter_scores_are_the_ssm_models_log_probabilities(checkpoint):
    _, _, model = checkpoint
    adapter = NeoXEvalAdapter(TokenGenerator(model, ParallelState.single(), eod=0,
                                             vocab_size=512), TOK, batch_size=2)
    pairs = [("def f(x):", " return x"), ("abc", "d")]
    got = adapter.loglikelihood([Request(p) for p in pairs])
    for (context, continuation), (value, _greedy) in zip(pairs, got):
        ctx, cont = TOK.tokenize(context), TOK.tokenize(continuation)
        logprobs = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0], dim=-1)
        want = sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)
    # greedy generation through the adapter is the model's own argmax continuation
    [text] = adapter.generate_until([Request(("def f(x):", {"until": ["\n"],
                                                             "max_gen_toks": 5}))])
    ids = TOK.tokenize("def f(x):")
    start = len(ids)
    for _ in range(5):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert text == TOK.detokenize(ids[start:]).split("\n")[0]
