"""megatron/evaluation/adapter.py checked against log-probabilities computed directly."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_helpers import MODEL, random_model, resolved  # noqa: E402

from megatron.evaluation.adapter import NeoXEvalAdapter  # noqa: E402
from megatron.model import lm_loss  # noqa: E402
from megatron.parallel import ParallelState  # noqa: E402
from megatron.text_generation import TokenGenerator  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

TOK = build_tokenizer("CharLevelTokenizer")


@dataclass
class Request:
    args: tuple


def adapter_for(model, batch_size: int = 1, state: ParallelState | None = None):
    gen = TokenGenerator(model, state or ParallelState.single(), eod=0, vocab_size=512)
    return NeoXEvalAdapter(gen, TOK, batch_size=batch_size)


@torch.no_grad()
def direct_logprob(model, context_ids: list[int], target_ids: list[int]) -> tuple[float, bool]:
    tokens = torch.tensor([context_ids + target_ids[:-1]])
    logprobs = torch.log_softmax(model(tokens)[0].float(), dim=-1)
    rows = logprobs[len(context_ids) - 1: len(context_ids) - 1 + len(target_ids)]
    picked = [float(rows[i, t]) for i, t in enumerate(target_ids)]
    return sum(picked), all(int(rows[i].argmax()) == t for i, t in enumerate(target_ids))


@pytest.fixture(scope="module")
def model():
    return random_model(MODEL, seed=9)


def test_loglikelihood_equals_the_log_softmax_sum(model):
    ids = TOK.tokenize
    requests = [("def f(x):", " return x"), ("a b ", "c"), ("", "hello"), ("x" * 70, "yz")]
    expected = [
        direct_logprob(model, ids("def f(x):"), ids(" return x")),
        direct_logprob(model, ids("a b"), ids(" c")),  # the trailing space moves
        direct_logprob(model, [0], ids("hello")),  # empty context: eod
        direct_logprob(model, ids("x" * 70)[-47:], ids("yz")),  # the last 48 positions
    ]
    for batch in (1, 3):
        got = adapter_for(model, batch).loglikelihood([Request(r) for r in requests])
        for (value, greedy), (want, want_greedy) in zip(got, expected):
            assert value == pytest.approx(want, abs=1e-4)
            assert greedy == want_greedy
    # the same number from the training loss (vocab-parallel cross entropy)
    tokens = torch.tensor([ids("def f(x): return x")])
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros_like(tokens, dtype=torch.float)
    mask[0, len("def f(x):") - 1: -1] = 1.0
    with torch.no_grad():
        loss = lm_loss(model(tokens), labels, mask, ParallelState.single())
    assert got[0][0] == pytest.approx(-float(loss) * float(mask.sum()), abs=1e-4)


def test_greedy_flag_is_true_for_the_models_own_continuation(model):
    gen = TokenGenerator(model, ParallelState.single(), eod=-1, vocab_size=512)
    from megatron.text_generation import SamplingParams

    own = gen.generate(TOK.tokenize("import "), SamplingParams(), 4).tokens
    adapter = adapter_for(model)
    (score, greedy), = adapter.score_tokens([(TOK.tokenize("import "), own)])
    assert greedy and score == pytest.approx(direct_logprob(model, TOK.tokenize("import "),
                                                            own)[0], abs=1e-4)
    other = [(own[0] + 1) % 256 or 1] + own[1:]
    assert not adapter.score_tokens([(TOK.tokenize("import "), other)])[0][1]


def test_loglikelihood_rolling_scores_disjoint_windows(model):
    adapter = adapter_for(model, batch_size=2)
    short = "print('hi')"
    t = TOK.tokenize(short)
    assert adapter.loglikelihood_rolling([Request((short,))])[0] == pytest.approx(
        direct_logprob(model, [0], t)[0], abs=1e-4)
    text = "".join(chr(97 + (i * 7) % 26) for i in range(60))  # 60 tokens, context 48
    t = TOK.tokenize(text)
    first = direct_logprob(model, [0], t[:48])[0]
    with torch.no_grad():  # second window: the 48 tokens before the end predict the last 12
        logprobs = torch.log_softmax(model(torch.tensor([t[11:59]]))[0], dim=-1)
    second = sum(float(logprobs[36 + i, t[48 + i]]) for i in range(12))
    assert adapter.loglikelihood_rolling([Request((text,))])[0] == pytest.approx(
        first + second, abs=1e-3)


def test_generate_until_stops_at_the_first_stop_string(model):
    from megatron.text_generation import SamplingParams

    gen = TokenGenerator(model, ParallelState.single(), eod=0, vocab_size=512)
    tokens = gen.generate(TOK.tokenize("Q: "), SamplingParams(), 12).tokens
    full = TOK.detokenize(tokens)
    assert len(full) >= 6
    stop = full[3:5]
    adapter = adapter_for(model)
    (out,) = adapter.generate_until([Request(("Q: ", {"until": [stop], "max_gen_toks": 12}))])
    assert out == full.split(stop)[0]
    (out,) = adapter.generate_until([Request(("Q: ", {"until": "\x00", "max_gen_toks": 4}))])
    assert out == TOK.detokenize(tokens[:4])


def _tp2_scores(rank, world, values, state_dict, requests):
    from megatron.checkpoint.reshard import shard_state_dict
    from megatron.model import GPTModel
    from megatron.parallel import RankTopology

    cfg = resolved({**values, "model_parallel_size": 2}, world_size=2)
    state = ParallelState.initialize(RankTopology(world, 2, 1), rank)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state)
    model.load_state_dict(shard_state_dict(state_dict, cfg.model, 2, state.tp_rank))
    adapter = adapter_for(model.eval(), batch_size=2, state=state)
    return (adapter.loglikelihood([Request(r) for r in requests]),
            adapter.generate_until([Request(("Q: ", {"until": ["\n"], "max_gen_toks": 6}))]))


@pytest.mark.distributed
def test_tensor_parallel_adapter_matches_one_rank(model):
    from tests.distributed import run_distributed

    requests = [("def f(x):", " return x"), ("", "hello world")]
    results = run_distributed(_tp2_scores, 2, MODEL, model.state_dict(), requests)
    assert results[0] == results[1]
    single = adapter_for(model, batch_size=2)
    for (value, greedy), (want, want_greedy) in zip(
            results[0][0], single.loglikelihood([Request(r) for r in requests])):
        assert value == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert results[0][1] == single.generate_until(
        [Request(("Q: ", {"until": ["\n"], "max_gen_toks": 6}))])


def test_eval_keys_reach_lm_eval(monkeypatch) -> None:
    import lm_eval

    from megatron.evaluation import runner

    seen: dict = {}
    monkeypatch.setattr(runner, "task_manager", lambda tasks, include: "manager")
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: seen.update(kw) or {"r": 1})
    base = {**MODEL, "train_micro_batch_size_per_gpu": 3, "eval_tasks": ["lambada_openai"]}
    cfg = resolved({**base, "eval_num_fewshot": 2, "eval_limit": 5, "eval_batch_size": 7})
    assert runner.run_tasks("adapter", cfg) == {"r": 1}
    assert (seen["num_fewshot"], seen["limit"], seen["tasks"]) == (2, 5, ["lambada_openai"])
    assert seen["model"] == "adapter" and seen["task_manager"] == "manager"
    assert runner.eval_batch_size(cfg) == 7
    assert runner.eval_batch_size(resolved(base)) == 3  # unset: the training micro batch


def test_prompt_end_splits_the_input_file(tmp_path) -> None:
    from megatron.text_generation.runner import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo|three\n|")
    assert read_prompts(str(path)) == ["one", "two|three", "|"]
    assert read_prompts(str(path), "|") == ["one\ntwo", "three\n"]
    cfg = resolved({**MODEL, "prompt_end": "|"})
    assert read_prompts(str(path), cfg.textgen.prompt_end) == ["one\ntwo", "three\n"]
