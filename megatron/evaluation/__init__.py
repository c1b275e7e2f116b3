"""Evaluation with the lm-evaluation-harness: :class:`NeoXEvalAdapter` (an ``lm_eval`` model
over this framework's GPT model) and eval.py's runner. See ``docs/generation.md``."""

from __future__ import annotations

__all__ = ["NeoXEvalAdapter"]


def __getattr__(name: str) -> object:
    if name == "NeoXEvalAdapter":  # lm_eval is imported only when the adapter is used
        from megatron.evaluation.adapter import NeoXEvalAdapter

        return NeoXEvalAdapter
    raise AttributeError(name)
