"""Text generation with the plain GPT model: sampling, the generation loop (KV cache or full
recompute, tensor-parallel ranks agreeing on every token) and generate.py's modes.

::

    model = load_inference_model(cfg, state, device)
    gen = TokenGenerator(model, state, eod=tok.eod, vocab_size=tok.vocab_size, seed=1234)
    result = gen.generate(tok.tokenize("def f("), SamplingParams(temperature=0.8, top_k=40), 64)

See ``docs/generation.md``.
"""

from __future__ import annotations

from megatron.text_generation.generation import GenerationResult, TokenGenerator
from megatron.text_generation.model_setup import load_inference_model, load_weights
from megatron.text_generation.sampling import (
    SamplingParams,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "GenerationResult",
    "SamplingParams",
    "TokenGenerator",
    "load_inference_model",
    "load_weights",
    "sample_next",
    "top_k_filter",
    "top_p_filter",
]
