"""A synthetic preference task from the bundled corpus (Python's help topics, characters):
the chosen completion is the real continuation of a prompt, the rejected one the same
characters shuffled. Written with the post-training preprocessing library."""

from __future__ import annotations

import random
from pathlib import Path

from megatron.data.preprocess.post_training import LabeledWriter, prompt_completion_tokens
from megatron.tokenizer import build_tokenizer

PROMPT_CHARS = 20
COMPLETION_CHARS = 20
CHATML = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] "
          "+ '\\n' }}{% endfor %}")


def _snippets(count: int, seed: int, prompt_chars: int = PROMPT_CHARS,
              completion_chars: int = COMPLETION_CHARS) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k].split()) for k in sorted(topics))
    rng = random.Random(seed)
    span = prompt_chars + completion_chars
    out = []
    for _ in range(count):
        start = rng.randrange(0, len(text) - span)
        piece = text[start:start + span]
        out.append((piece[:prompt_chars], piece[prompt_chars:]))
    return out


def _shuffled(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(10):
        rng.shuffle(chars)
        if "".join(chars) != text:
            break
    return "".join(chars)


def preference_pairs(count: int, seed: int, **chars: int) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` triples."""
    rng = random.Random(seed + 1)
    return [(p, c, _shuffled(c, rng)) for p, c in _snippets(count, seed, **chars)]


def write_pairwise(directory: Path, name: str, count: int, seed: int,
                   **chars: int) -> dict[str, str]:
    """Pairwise datasets (``PREFIX_chosen_*`` / ``PREFIX_rejected_*``); returns the prefixes
    by config key stem (pos, neg, pos_label, neg_label). ``chars``: ``prompt_chars`` and
    ``completion_chars`` (20 each by default)."""
    tok = build_tokenizer("CharLevelTokenizer")
    prefix = str(directory / name)
    writers = {k: LabeledWriter(prefix, k, tok.vocab_size, False) for k in ("chosen", "rejected")}
    for prompt, chosen, rejected in preference_pairs(count, seed, **chars):
        for key, completion in (("chosen", chosen), ("rejected", rejected)):
            writers[key].add(*prompt_completion_tokens(prompt, completion, tok, append_eod=True))
    for w in writers.values():
        w.finalize()
    return {"pos": writers["chosen"].prefixes["text"],
            "pos_label": writers["chosen"].prefixes["label"],
            "neg": writers["rejected"].prefixes["text"],
            "neg_label": writers["rejected"].prefixes["label"]}


def write_unpaired(directory: Path, name: str, count: int, seed: int) -> dict[str, str]:
    """KTO data: alternately the real (desirable) and the shuffled (undesirable) completion."""
    tok = build_tokenizer("CharLevelTokenizer")
    w = LabeledWriter(str(directory / name), "messages", tok.vocab_size, True)
    for i, (prompt, chosen, rejected) in enumerate(preference_pairs(count, seed)):
        good = i % 2 == 0
        w.add(*prompt_completion_tokens(prompt, chosen if good else rejected, tok,
                                        append_eod=True), 1 if good else -1)
    w.finalize()
    return {"data": w.prefixes["text"], "label": w.prefixes["label"],
            "reward": w.prefixes["reward"]}


def pairwise_values(train: dict[str, str], valid: dict[str, str]) -> dict[str, object]:
    return {
        "dataset_impl": "pairwise",
        "pos_train_data_paths": [train["pos"]], "neg_train_data_paths": [train["neg"]],
        "pos_train_label_data_paths": [train["pos_label"]],
        "neg_train_label_data_paths": [train["neg_label"]],
        "pos_valid_data_paths": [valid["pos"]], "neg_valid_data_paths": [valid["neg"]],
        "pos_valid_label_data_paths": [valid["pos_label"]],
        "neg_valid_label_data_paths": [valid["neg_label"]],
    }


def write_chat(directory: Path, name: str, count: int, seed: int) -> dict[str, str]:
    """SFT data: one user turn (the prompt) and one assistant turn (the real continuation)
    through a ChatML-like template; only the assistant turn is labelled."""
    from megatron.data.preprocess.post_training import ChatTemplate, chat_tokens

    tok = build_tokenizer("CharLevelTokenizer")
    template = ChatTemplate("chatml", CHATML)
    w = LabeledWriter(str(directory / name), "messages", tok.vocab_size, False)
    for prompt, chosen, _ in preference_pairs(count, seed):
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": chosen}]
        w.add(*chat_tokens(messages, template, tok, append_eod=True))
    w.finalize()
    return {"data": w.prefixes["text"], "label": w.prefixes["label"]}
