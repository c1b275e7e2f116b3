"""Post-training data: chat transcripts, prompt/completion pairs and preference data, tokenized
into indexed datasets with aligned label datasets (-100 = not trained on).

Chat data (``tools/datasets/preprocess_data_with_chat_template.py``)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

is rendered with a Jinja chat template (the ``chat_template`` of a local
``tokenizer_config.json``, or a template file; nothing is downloaded), one turn at a time:
the text a turn adds to the rendering of the turns before it is tokenized on its own, and its
labels are its tokens when the turn's role is ``--generation-role`` (assistant) and -100
otherwise. ``--only-last`` trains only the last such turn. ``--for-rm`` (both tools, as
GPT-NeoX's) labels only the end-of-document token, where a reward model reads its reward.

Prompt/completion data (``tools/datasets/preprocess_data_with_mask.py``)::

    {"prompt": "...", "completion": "..."}             # SFT
    {"prompt": "...", "chosen": "...", "rejected": "..."}   # preference pairs

gives one dataset per completion key (prompt + completion tokens; labels -100 on the prompt).

For every key ``K`` the outputs are ``PREFIX_K_document`` (tokens) and
``PREFIX_K_label_document`` (labels), and with ``--reward-key`` ``PREFIX_K_reward_document``
(one value per document: +1 desirable, -1 undesirable, for KTO). Preference pairs are the
``chosen`` and ``rejected`` keys of one run: GPT-NeoX's pairwise layout (``pos_*`` and
``neg_*`` data and label paths, ``dataset_impl: pairwise``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.data.preprocess.text_inputs import InputError, expand_inputs
from megatron.tokenizer.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer

IGNORE = -100


class PostTrainDataError(ValueError):
    """A bad input record or template, with where it came from."""


# ------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ChatTemplate:
    """A compiled Jinja chat template and the special tokens it may refer to."""

    source: str
    text: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
               ) -> str:
        template = _compile(self.text, self.source)
        try:
            return template.render(messages=list(messages), bos_token=self.bos_token,
                                   eos_token=self.eos_token,
                                   add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # the template's own raise_exception, undefined names, ...
            raise PostTrainDataError(f"{self.source}: chat template failed: {exc}") from None


_COMPILED: dict[tuple[str, str], Any] = {}


def _compile(text: str, source: str) -> Any:
    cached = _COMPILED.get((source, text))
    if cached is not None:
        return cached
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise PostTrainDataError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(text)
    except TemplateError as exc:
        raise PostTrainDataError(f"{source}: not a valid Jinja template: {exc}") from None
    _COMPILED[(source, text)] = compiled
    return compiled


def _special(config: dict[str, Any], name: str) -> str:
    value = config.get(name) or ""
    if isinstance(value, dict):  # {"content": "<s>", ...} in some tokenizer_config files
        value = value.get("content", "")
    return str(value)


def load_chat_template(*, tokenizer_config: str | Path | None = None,
                       template_file: str | Path | None = None) -> ChatTemplate:
    """The chat template of a ``tokenizer_config.json`` (its ``chat_template``, with its
    ``bos_token``/``eos_token``), or of a Jinja file (which then wins over the config's)."""
    config: dict[str, Any] = {}
    if tokenizer_config is not None:
        path = Path(tokenizer_config)
        if path.is_dir():
            path = path / "tokenizer_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PostTrainDataError(f"{path}: cannot read a tokenizer config: {exc}") from None
    if template_file is not None:
        try:
            text = Path(template_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise PostTrainDataError(f"{template_file}: cannot read: {exc}") from None
        source = str(template_file)
    else:
        raw = config.get("chat_template")
        if isinstance(raw, list):  # named templates: take "default"
            raw = next((t.get("template") for t in raw if t.get("name") == "default"), None)
        if not isinstance(raw, str) or not raw:
            raise PostTrainDataError(f"{tokenizer_config}: no chat_template in the tokenizer "
                                     "config (give --chat-template FILE)")
        text, source = raw, f"{tokenizer_config} chat_template"
    tmpl = ChatTemplate(source, text, _special(config, "bos_token"), _special(config, "eos_token"))
    _compile(tmpl.text, tmpl.source)
    return tmpl


# ------------------------------------------------------------------------- tokenizing
def chat_tokens(messages: Sequence[dict[str, Any]], template: ChatTemplate, tokenizer: Any, *,
                generation_role: str = "assistant", only_last: bool = False,
                mask: bool = True, append_eod: bool = False) -> tuple[list[int], list[int]]:
    """Tokens and labels of one transcript: labels equal the tokens on the turns of
    ``generation_role`` (the last of them with ``only_last``; all turns with ``mask`` off)
    and are -100 elsewhere."""
    if not isinstance(messages, list) or not messages:
        raise PostTrainDataError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise PostTrainDataError("every message needs a string role and content")
    train_turns = [i for i, m in enumerate(messages) if m["role"] == generation_role]
    if only_last:
        train_turns = train_turns[-1:]
    tokens: list[int] = []
    labels: list[int] = []
    before = ""
    for i in range(len(messages)):
        text = template.render(messages[:i + 1])
        if not text.startswith(before):
            raise PostTrainDataError(f"{template.source}: rendering turn {i + 1} does not "
                                     "extend the rendering of the turns before it")
        piece = tokenizer.tokenize(text[len(before):]) if len(text) > len(before) else []
        before = text
        tokens += piece
        trained = not mask or i in train_turns
        labels += piece if trained else [IGNORE] * len(piece)
    if append_eod:
        tokens.append(tokenizer.eod)
        labels.append(tokenizer.eod if (not mask or train_turns) else IGNORE)
    return tokens, labels


def prompt_completion_tokens(prompt: str, completion: str, tokenizer: Any, *,
                             append_eod: bool = False) -> tuple[list[int], list[int]]:
    """``prompt + completion`` tokens; labels -100 on the prompt."""
    p = tokenizer.tokenize(prompt) if prompt else []
    c = tokenizer.tokenize(completion)
    tokens = p + c
    labels = [IGNORE] * len(p) + list(c)
    if append_eod:
        tokens.append(tokenizer.eod)
        labels.append(tokenizer.eod)
    return tokens, labels


# ------------------------------------------------------------------------- writing
def dataset_prefixes(output_prefix: str, key: str) -> dict[str, str]:
    return {"text": f"{output_prefix}_{key}_document",
            "label": f"{output_prefix}_{key}_label_document",
            "reward": f"{output_prefix}_{key}_reward_document"}


class LabeledWriter:
    """Token, label (and reward) datasets of one key, finalized together."""

    def __init__(self, output_prefix: str, key: str, vocab_size: int, with_reward: bool):
        import numpy as np

        from megatron.data.indexed_dataset import (
            MMapIndexedDatasetBuilder,
            best_fitting_dtype,
            data_file_path,
        )

        self.prefixes = dataset_prefixes(output_prefix, key)
        Path(self.prefixes["text"]).parent.mkdir(parents=True, exist_ok=True)
        kinds = ("text", "label", "reward") if with_reward else ("text", "label")
        dtypes = {"text": best_fitting_dtype(vocab_size), "label": np.int32, "reward": np.int32}
        self.builders = {k: MMapIndexedDatasetBuilder(data_file_path(self.prefixes[k]),
                                                      dtypes[k]) for k in kinds}
        self.documents = 0

    def add(self, tokens: list[int], labels: list[int], reward: int | None = None) -> None:
        self.builders["text"].add_document(tokens)
        self.builders["label"].add_document(labels)
        if "reward" in self.builders:
            self.builders["reward"].add_document([int(reward or 0)])
        self.documents += 1

    def finalize(self) -> None:
        from megatron.data.indexed_dataset import index_file_path

        for kind, b in self.builders.items():
            b.finalize(index_file_path(self.prefixes[kind]))

    def discard(self) -> None:
        for b in self.builders.values():
            b.discard()


def _records(inputs: Sequence[str], num_docs: int | None) -> Iterator[tuple[str, int, Any]]:
    count = 0
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if num_docs is not None and count >= num_docs:
                    return
                try:
                    yield path, line_no, json.loads(line)
                except ValueError as exc:
                    raise PostTrainDataError(f"{path}:{line_no}: invalid JSON: {exc}") from None
                count += 1


def _reward_of(record: dict[str, Any], reward_key: str, where: str) -> int:
    value = record.get(reward_key)
    if isinstance(value, bool):
        return 1 if value else -1
    if not isinstance(value, (int, float)):
        raise PostTrainDataError(f"{where}: {reward_key!r} must be a number or a boolean")
    return 1 if value > 0 else -1


def write_datasets(records: Iterator[tuple[str, int, Any]], keys: Sequence[str],
                   output_prefix: str, tokenizer: Any, encode: Any,
                   reward_key: str | None = None) -> dict[str, dict[str, str]]:
    """Encode every record's ``keys`` with ``encode(record, key) -> (tokens, labels)`` and
    write the datasets; a bad record stops the run naming its file and line."""
    writers = {k: LabeledWriter(output_prefix, k, tokenizer.vocab_size, reward_key is not None)
               for k in keys}
    try:
        for path, line_no, record in records:
            where = f"{path}:{line_no}"
            if not isinstance(record, dict):
                raise PostTrainDataError(f"{where}: a record must be a JSON object")
            reward = _reward_of(record, reward_key, where) if reward_key else None
            encoded = []
            for k in keys:
                try:
                    tokens, labels = encode(record, k)
                except PostTrainDataError as exc:
                    raise PostTrainDataError(f"{where}: {k}: {exc}") from None
                if not tokens:
                    raise PostTrainDataError(f"{where}: {k}: no tokens")
                encoded.append((tokens, labels))
            for k, (tokens, labels) in zip(keys, encoded):
                writers[k].add(tokens, labels, reward)
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    return {k: w.prefixes for k, w in writers.items()}


# ------------------------------------------------------------------------- command lines
def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="jsonl file(s), comma-separated")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", default="HFTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", help="tokenizer file (tokenizer.json, vocab.json, ...)")
    p.add_argument("--merge-file", help="BPE merges (GPT2BPETokenizer)")
    p.add_argument("--append-eod", action="store_true", help="end every document with eod")
    p.add_argument("--num-docs", type=int, help="stop after this many records")
    p.add_argument("--reward-key", help="write PREFIX_K_reward_document from this key "
                   "(> 0 or true: desirable; KTO)")
    p.add_argument("--for-rm", action="store_true", help="reward-model data: label only the "
                   "end-of-document token (appended), as GPT-NeoX's --for-rm")


def reward_model_labels(tokens: list[int], eod: int) -> tuple[list[int], list[int]]:
    """``--for-rm``: the tokens ending with ``eod`` (appended when missing) and labels -100
    everywhere but on that last token, where the reward is read."""
    if not tokens or tokens[-1] != eod:
        tokens = [*tokens, eod]
    return tokens, [IGNORE] * (len(tokens) - 1) + [eod]


def _run(args: argparse.Namespace, keys: Sequence[str], encode: Any, tokenizer: Any) -> int:
    try:
        inputs = expand_inputs(args.input)
        out = write_datasets(_records(inputs, args.num_docs), keys, args.output_prefix,
                             tokenizer, encode, args.reward_key)
    except (PostTrainDataError, InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for k, prefixes in out.items():
        print(f"{k}: {prefixes['text']} (labels {prefixes['label']})")
    return 0


def _tokenizer(args: argparse.Namespace, vocab_file: str | None) -> Any:
    return build_tokenizer(args.tokenizer_type, vocab_file, args.merge_file)


def chat_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenize chat transcripts with a chat template; "
                                "labels only on the assistant turns.")
    _common_args(p)
    p.add_argument("--jsonl-keys", nargs="+", default=["messages"],
                   help="keys holding message lists (e.g. chosen rejected for pairs)")
    p.add_argument("--tokenizer-path", help="a local Hugging Face tokenizer directory "
                   "(tokenizer.json + tokenizer_config.json with its chat_template)")
    p.add_argument("--tokenizer-config", help="tokenizer_config.json with a chat_template")
    p.add_argument("--chat-template", help="a Jinja chat-template file")
    p.add_argument("--generation-role", default="assistant", help="the role trained on")
    p.add_argument("--only-last", action="store_true", help="train only the last turn")
    p.add_argument("--no-mask", action="store_true", help="train on every turn")
    args = p.parse_args(argv)
    config = args.tokenizer_config
    vocab = args.vocab_file
    if args.tokenizer_path:
        config = config or str(Path(args.tokenizer_path) / "tokenizer_config.json")
        vocab = vocab or str(Path(args.tokenizer_path) / "tokenizer.json")
    if config is None and args.chat_template is None:
        p.error("give --chat-template, --tokenizer-config or --tokenizer-path")
    try:
        template = load_chat_template(tokenizer_config=config, template_file=args.chat_template)
        tokenizer = _tokenizer(args, vocab)
    except (PostTrainDataError, TokenizerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def encode(record: dict[str, Any], key: str) -> tuple[list[int], list[int]]:
        if key not in record:
            raise PostTrainDataError("missing")
        tokens, labels = chat_tokens(record[key], template, tokenizer,
                                     generation_role=args.generation_role,
                                     only_last=args.only_last, mask=not args.no_mask,
                                     append_eod=args.append_eod)
        return reward_model_labels(tokens, tokenizer.eod) if args.for_rm else (tokens, labels)

    return _run(args, args.jsonl_keys, encode, tokenizer)


def mask_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenize prompt + completion records; labels "
                                "-100 on the prompt.")
    _common_args(p)
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--completion-keys", nargs="+", default=["completion"],
                   help="one dataset per key (chosen rejected for preference pairs)")
    args = p.parse_args(argv)
    try:
        tokenizer = _tokenizer(args, args.vocab_file)
    except (TokenizerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def encode(record: dict[str, Any], key: str) -> tuple[list[int], list[int]]:
        prompt, completion = record.get(args.prompt_key, ""), record.get(key)
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise PostTrainDataError(f"needs string {args.prompt_key!r} and a non-empty {key!r}")
        tokens, labels = prompt_completion_tokens(prompt, completion, tokenizer,
                                                  append_eod=args.append_eod)
        return reward_model_labels(tokens, tokenizer.eod) if args.for_rm else (tokens, labels)

    return _run(args, args.completion_keys, encode, tokenizer)
