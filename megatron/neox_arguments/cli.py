"""Command-line handling shared by deepy.py and the worker scripts.

deepy.py: ``[options] USER_SCRIPT CONFIG [CONFIG ...] [--key value ...]``; keys after the
config files override them (``--train_iters 20``, ``--eval_tasks lambada hellaswag``).

Workers (train.py, generate.py, eval.py) receive ``--neox_config <encoded merged config>``
from deepy.py and ``--local_rank`` from DeepSpeed's launcher; they can also be started
directly with config files for a single process (``python train.py configs/tiny.yml``).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.loader import MergedConfig, load_config_files
from megatron.neox_arguments.schema import canonical_name

COMMAND_LINE = "<command line>"


def parse_key_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key v`` / ``--key=v`` / ``--key v1 v2`` (a list) / ``--flag`` (true) -> values."""
    out: dict[str, Any] = {}
    name: str | None = None
    items: list[Any] = []

    def flush() -> None:
        if name is None:
            return
        if not items:
            out[name] = True
        elif len(items) == 1:
            out[name] = items[0]
        else:
            out[name] = items

    for token in tokens:
        if token.startswith("--"):
            flush()
            body = token[2:]
            name, items = canonical_name(body.split("=", 1)[0]), []
            if "=" in body:
                items.append(_scalar(body.split("=", 1)[1]))
        elif name is None:
            raise ConfigError(f"{COMMAND_LINE}: unexpected argument {token!r} (expected --key)")
        else:
            items.append(_scalar(token))
    flush()
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_configs_and_overrides(rest: list[str]) -> tuple[list[str], list[str]]:
    """Config names come first; everything from the first ``--`` option on are overrides."""
    for i, token in enumerate(rest):
        if token.startswith("--"):
            return rest[:i], rest[i:]
    return rest, []


def worker_merged_config(argv: list[str]) -> tuple[MergedConfig, int | None]:
    """The merged config and local rank a worker script was started with."""
    local_rank: int | None = None
    blob: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--local_rank"):
            if "=" in token:
                local_rank = int(token.split("=", 1)[1])
            else:
                local_rank = int(argv[i + 1])
                i += 1
        elif token == "--neox_config":
            blob = argv[i + 1]
            i += 1
        elif token.startswith("--neox_config="):
            blob = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    if blob is not None:
        merged = MergedConfig.decode(blob)
        _, overrides = split_configs_and_overrides(rest)
    else:
        names, overrides = split_configs_and_overrides(rest)
        if not names:
            raise ConfigError("no config given: run through deepy.py, or pass config files")
        merged = load_config_files(names)
    if overrides:
        merged = merged.with_values(parse_key_overrides(overrides), COMMAND_LINE)
    return merged, local_rank
