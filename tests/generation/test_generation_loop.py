"""megatron/text_generation/generation.py: KV cache vs recompute, stops, limits, TP ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_helpers import MODEL, random_model, resolved  # noqa: E402

from megatron.parallel import ParallelState  # noqa: E402
from megatron.text_generation import SamplingParams, TokenGenerator  # noqa: E402

PROMPT = [ord(c) for c in "def main():"]
VARIANTS = {
    "llama_gqa": {},
    "neox_partial_parallel": dict(norm="layernorm", activation="gelu", num_kv_heads=4,
                                  rotary_pct=0.5, gpt_j_residual=True, intermediate_size=None,
                                  use_bias_in_attn_linear=True, use_bias_in_mlp=True),
    "sliding_window": dict(attention_config=[[["local", "global"], 2]], sliding_window_width=5),
    "learned_positions": dict(pos_emb="learned", no_weight_tying=False),
}


def generator(model, eod: int = 0, **kwargs) -> TokenGenerator:
    return TokenGenerator(model, ParallelState.single(), eod=eod, vocab_size=300, **kwargs)


def reference_greedy(model, prompt: list[int], steps: int, vocab: int = 300) -> list[int]:
    """Greedy decoding written out: full forward, argmax over the real vocabulary."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1, :vocab]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kv_cache_and_recompute_give_the_same_tokens(name):
    model = random_model({**MODEL, **VARIANTS[name]}, seed=1)
    expected = reference_greedy(model, PROMPT, 12)
    for recompute in (False, True):
        out = generator(model, recompute=recompute, eod=-1).generate(
            PROMPT, SamplingParams(), max_new_tokens=12)
        assert out.tokens == expected and out.stop_reason == "length"
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    cached = generator(model, seed=3).generate(PROMPT, params, 16).tokens
    recomputed = generator(model, seed=3, recompute=True).generate(PROMPT, params, 16).tokens
    assert cached == recomputed
    assert generator(model, seed=4).generate(PROMPT, params, 16).tokens != cached


def test_stops_at_eod_and_at_a_stop_condition():
    model = random_model(MODEL, seed=2)
    free = generator(model, eod=-1).generate(PROMPT, SamplingParams(), 10).tokens
    first_new = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 2)
    eod = free[first_new]
    out = generator(model, eod=eod).generate(PROMPT, SamplingParams(), 10)
    assert out.stop_reason == "eod" and out.tokens == free[:first_new]
    out = generator(model, eod=-1).generate(PROMPT, SamplingParams(), 10,
                                            stop=lambda toks: len(toks) == 3)
    assert out.stop_reason == "stop" and out.tokens == free[:3]
    logits = model(torch.tensor([PROMPT]))[0, -1].tolist()
    assert out.logits[0] == pytest.approx(logits[free[0]], abs=1e-5)


def test_long_prompts_keep_their_end_and_the_context_limit_holds():
    model = random_model(MODEL, seed=3)  # max_position_embeddings 48
    prompt = [ord("a") + i % 26 for i in range(60)]
    out = generator(model, eod=-1).generate(prompt, SamplingParams(), 20)
    assert out.truncated and len(out.tokens) == 1 and out.stop_reason == "length"
    assert out.tokens == reference_greedy(model, prompt[-47:], 1)
    out = generator(model, eod=-1).generate(prompt[:40], SamplingParams(), 20)
    assert len(out.tokens) == 8 and not out.truncated
    unconditional = generator(model, eod=0).generate([], SamplingParams(), 5)
    assert unconditional.prompt_tokens == [0]
    assert unconditional.tokens == reference_greedy(model, [0], 5)[:len(unconditional.tokens)]


def _tp2_generate(rank, world, values, state_dict, params, recompute):
    from megatron.checkpoint.reshard import shard_state_dict
    from megatron.model import GPTModel
    from megatron.parallel import RankTopology

    cfg = resolved({**values, "model_parallel_size": 2}, world_size=2)
    state = ParallelState.initialize(RankTopology(world, 2, 1), rank)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=state)
    model.load_state_dict(shard_state_dict(state_dict, cfg.model, 2, state.tp_rank))
    gen = TokenGenerator(model.eval(), state, eod=0, vocab_size=300, seed=11,
                         recompute=recompute)
    return [gen.generate(PROMPT, params, 14).tokens, gen.generate([], params, 6).tokens]


@pytest.mark.distributed
def test_tensor_parallel_ranks_agree_and_match_one_rank():
    from tests.distributed import run_distributed

    model = random_model(MODEL, seed=5)
    sd = model.state_dict()
    greedy = run_distributed(_tp2_generate, 2, MODEL, sd, SamplingParams(), False)
    assert greedy[0] == greedy[1]
    single = generator(model, seed=11)
    assert greedy[0] == [single.generate(PROMPT, SamplingParams(), 14).tokens,
                         single.generate([], SamplingParams(), 6).tokens]
    params = SamplingParams(temperature=0.9, top_k=30)
    sampled = run_distributed(_tp2_generate, 2, MODEL, sd, params, True)
    assert sampled[0] == sampled[1] and len(sampled[0][0]) > 0
