"""The lm-evaluation-harness model interface over this framework's GPT model.

:class:`NeoXEvalAdapter` subclasses ``lm_eval.api.model.LM``:

* ``loglikelihood``: for ``(context, continuation)`` the sum of the log-probabilities of the
  continuation's tokens given the context, and whether each of them is the argmax. Trailing
  spaces of the context move to the continuation; the continuation's tokens are those of
  ``tokenize(context + continuation)`` after ``tokenize(context)`` (an empty context is the
  end-of-document token). Inputs longer than the model's context keep their last tokens.
  Requests are run in batches of ``batch_size``, longest first, right-padded.
* ``loglikelihood_rolling``: the whole text scored in disjoint windows of the model's context
  (``lm_eval.utils.get_rolling_token_windows``, end-of-document token as prefix).
* ``generate_until``: greedy (or sampled, with ``do_sample``/``temperature``) continuation
  through :class:`~megatron.text_generation.TokenGenerator`, cut at the first ``until`` string,
  at most ``max_gen_toks`` tokens.

Log-probabilities are the fp32 log-softmax over the full (padded) vocabulary, gathered over the
tensor-parallel ranks. The adapter reports ``rank`` 0 and ``world_size`` 1 on every rank: every
rank runs every request in the same order (tensor-parallel ranks must run the model together;
data-parallel ranks repeat the work), and only global rank 0 writes results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron.text_generation.generation import TokenGenerator
from megatron.text_generation.sampling import SamplingParams

try:
    from lm_eval.api.model import LM
except ImportError as _exc:  # pragma: no cover - lm_eval is an optional extra
    raise ImportError("eval.py needs the lm_eval package (pip install lm_eval)") from _exc

Scored = tuple[float, bool]


class NeoXEvalAdapter(LM):
    def __init__(self, generator: TokenGenerator, tokenizer: Any, *, batch_size: int = 1,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.gen = generator
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.max_length = max_length or generator.max_length
        self.eod = tokenizer.eod

    # ------------------------------------------------------------------ LM interface
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.tokenize(text)) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens (trailing context spaces go to the continuation)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.eod], self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[Scored]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        return self.score_tokens(pairs)

    def loglikelihood_rolling(self, requests: Sequence[Any],
                              disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args[:1]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eod, max_seq_len=self.max_length,
                context_len=1)]
            scores = self.score_tokens(windows)
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            if not kwargs.get("do_sample", False):
                temperature = 0.0
            params = SamplingParams(temperature=temperature,
                                    top_k=int(kwargs.get("top_k", 0) or 0),
                                    top_p=float(kwargs.get("top_p", 0.0) or 0.0))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):]

            def stop(tokens: list[int], until: list[str] = until) -> bool:
                text = self.tokenizer.detokenize(tokens)
                return any(u and u in text for u in until)

            result = self.gen.generate(prompt, params, max_new, stop=stop if until else None)
            text = self.tokenizer.detokenize(result.tokens)
            for u in until:
                if u:
                    text = text.split(u)[0]
            out.append(text)
        return out

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """``(sum of log p(continuation | context), all greedy)`` for token pairs."""
        items = []
        for context, continuation in pairs:
            if not continuation:
                items.append(([self.eod], 0))
                continue
            ids = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            items.append((ids, min(len(continuation), len(ids))))
        targets = [(list(c) + list(t))[-n:] if n else [] for (c, t), (_, n) in zip(pairs, items)]
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results: list[Scored] = [(0.0, True)] * len(items)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(items[i][0]) for i in batch)
            tokens = torch.full((len(batch), width), self.eod, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, :len(items[i][0])] = torch.tensor(items[i][0])
            logprobs = torch.log_softmax(
                self.gen.full_logits(tokens.to(self.gen.device)), dim=-1).cpu()
            for row, i in enumerate(batch):
                ids, n = items[i]
                if n == 0:
                    continue
                rows = logprobs[row, len(ids) - n:len(ids)]
                target = torch.tensor(targets[i])
                picked = rows.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((rows.argmax(dim=-1) == target).all())
                results[i] = (float(picked.double().sum()), greedy)
        return results
