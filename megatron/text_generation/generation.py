"""The generation loop: one prompt at a time, KV cache or full recompute, over TP ranks.

::

    gen = TokenGenerator(model, state, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size,
                         seed=1234)
    result = gen.generate(prompt_ids, SamplingParams(temperature=0.0), max_new_tokens=32)
    result.tokens, result.stop_reason                   # generated ids (no EOD), "eod" | ...

With the KV cache (default) the prompt runs once (prefill) and every step feeds the one new
token; ``recompute=True`` runs the whole sequence at every step instead (same tokens, slower;
a check of the cache and the path for models that cannot cache). Every tensor-parallel rank
runs the model on its shards; the full-vocabulary logits are gathered, tensor-parallel rank 0
picks the token and broadcasts it to its group, so all ranks continue with the same token even
if their logits differed in the last bit.

The sequence is capped at ``max_length`` positions (default ``max_position_embeddings``):
a longer prompt keeps its last ``max_length - 1`` tokens (``truncated`` is set) and generation
stops at the cap (stop reason ``length``). Generation stops at the end-of-document token
(not included in ``tokens``), after ``max_new_tokens``, or when ``stop(tokens)`` returns True.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron.model.gpt import GPTModel, gather_logits
from megatron.parallel.state import ParallelState
from megatron.text_generation.sampling import SamplingParams, sample_next


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)  # raw logit of each generated token
    stop_reason: str = "length"  # eod | length | stop
    truncated: bool = False


class TokenGenerator:
    """Generates continuations with ``model`` (a :class:`GPTModel` in eval mode)."""

    def __init__(
        self,
        model: GPTModel,
        state: ParallelState,
        *,
        eod: int,
        vocab_size: int | None = None,
        seed: int = 1234,
        recompute: bool = False,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.state = state
        self.eod = eod
        self.vocab_size = vocab_size
        self.recompute = recompute
        max_positions = model.model_args.max_position_embeddings
        assert max_positions is not None
        self.max_length = min(max_length or max_positions, max_positions)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = model.embed.word_embeddings.weight.device

    # ------------------------------------------------------------------ helpers
    def full_logits(self, tokens: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Full-vocabulary fp32 logits ``[b, s, V]`` (gathered over tensor-parallel ranks)."""
        logits = self.model(tokens, **kwargs)  # type: ignore[arg-type]
        if self.state.tp_size > 1:
            logits = gather_logits(logits, self.state)
        return logits.float()

    def _agree(self, token: torch.Tensor) -> torch.Tensor:
        """Tensor-parallel rank 0's choice, on every rank of the group."""
        if self.state.tp_size > 1:
            token = token.contiguous()
            dist.broadcast(token, src=self.state.tp_ranks[0], group=self.state.tp_group)
        return token

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> GenerationResult:
        """Continue ``prompt`` (token ids; empty means an unconditional sample, which starts
        from the end-of-document token)."""
        ids = [int(t) for t in prompt] or [self.eod]
        result = GenerationResult(prompt_tokens=list(ids))
        if len(ids) >= self.max_length:
            ids = ids[len(ids) - max(self.max_length - 1, 1):]
            result.truncated = True
        budget = min(max_new_tokens, self.max_length - len(ids))
        if budget <= 0:
            return result
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        cache = None if self.recompute else \
            self.model.new_kv_cache(1, max_length=len(ids) + budget)
        logits = self.full_logits(tokens, kv_cache=cache)[:, -1]
        for step in range(budget):
            token = self._agree(sample_next(logits, params, self.generator, self.vocab_size))
            value = int(token.item())
            if value == self.eod:
                result.stop_reason = "eod"
                return result
            result.tokens.append(value)
            result.logits.append(float(logits[0, value]))
            if stop is not None and stop(result.tokens):
                result.stop_reason = "stop"
                return result
            if step == budget - 1:
                break
            tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
            if cache is None:
                logits = self.full_logits(tokens)[:, -1]
            else:
                logits = self.full_logits(token.view(1, 1), kv_cache=cache)[:, -1]
        result.stop_reason = "length"
        return result
