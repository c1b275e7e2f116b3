"""generate.py: the three ``text_gen_type`` modes and their inputs and outputs.

* ``unconditional``: ``num_samples`` samples from the end-of-document token;
* ``input-file``: the prompts of ``sample_input_file`` (split at ``prompt_end``, by default
  one per line; a trailing empty piece is dropped);
* ``interactive``: prompts read from standard input on rank 0, one per line, until EOF.

Unconditional and input-file results go to ``sample_output_file``, one JSON object per line::

    {"context": "...", "text": "<the continuation alone>", "length": 12,
     "tokens": [...], "context_tokens": [...], "stop_reason": "eod", "truncated": false}

(plus ``"logits"``, the raw logit of every generated token, with ``return_logits``). Rank 0
writes the file and prints the samples; every rank computes them. Prompts are generated one at
a time (no batching). Sampling draws from one generator seeded with ``seed``, so a run is
deterministic for a seed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist

from megatron.neox_arguments import ConfigError, NeoXConfig
from megatron.text_generation.generation import GenerationResult, TokenGenerator
from megatron.text_generation.model_setup import load_inference_model
from megatron.text_generation.sampling import SamplingParams


def sampling_params(cfg: NeoXConfig) -> SamplingParams:
    tg = cfg.textgen
    try:
        return SamplingParams(temperature=tg.temperature, top_k=tg.top_k, top_p=tg.top_p)
    except ValueError as exc:
        raise ConfigError(f"text generation: {exc}") from None


def read_prompts(path: str, separator: str = "\n") -> list[str]:
    """The prompts of an input file (split at ``separator``; a trailing empty piece dropped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"sample_input_file: cannot read {path} ({exc.strerror})") from None
    pieces = text.split(separator or "\n")
    if pieces and pieces[-1] == "":
        pieces.pop()
    return [p.rstrip("\r") for p in pieces]


def result_record(context: str, result: GenerationResult, tokenizer: Any, *,
                  return_logits: bool, seconds: float) -> dict[str, Any]:
    record: dict[str, Any] = {
        "context": context,
        "text": tokenizer.detokenize(result.tokens),
        "length": len(result.tokens),
        "tokens": result.tokens,
        "context_tokens": result.prompt_tokens if context else [],
        "stop_reason": result.stop_reason,
        "truncated": result.truncated,
        "seconds": round(seconds, 4),
    }
    if return_logits:
        record["logits"] = result.logits
    return record


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _broadcast_line(line: str | None) -> str | None:
    """Rank 0's input line (None at EOF) on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return line
    box = [line]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stdin_lines(stream: IO[str]) -> Iterator[str]:
    while True:
        line = stream.readline() if _is_rank0() else None
        if _is_rank0() and line == "":
            line = None
        line = _broadcast_line(line)
        if line is None:
            return
        yield line.rstrip("\n").rstrip("\r")


class Session:
    """Generation for one run: the model, tokenizer, sampling settings and outputs."""

    def __init__(self, cfg: NeoXConfig, generator: TokenGenerator, tokenizer: Any,
                 out: IO[str]) -> None:
        self.cfg = cfg
        self.generator = generator
        self.tokenizer = tokenizer
        self.params = sampling_params(cfg)
        self.out = out

    def complete(self, context: str) -> dict[str, Any]:
        start = time.time()
        prompt = self.tokenizer.tokenize(context) if context else []
        result = self.generator.generate(prompt, self.params, self.cfg.textgen.maximum_tokens)
        return result_record(context, result, self.tokenizer,
                             return_logits=self.cfg.textgen.return_logits,
                             seconds=time.time() - start)

    def write_records(self, contexts: list[str]) -> list[dict[str, Any]]:
        path = self.cfg.textgen.sample_output_file
        records = []
        handle = open(path, "w", encoding="utf-8") if _is_rank0() else None
        try:
            for i, context in enumerate(contexts):
                record = self.complete(context)
                records.append(record)
                if handle is not None:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    print(f"[{i + 1}/{len(contexts)}] {json.dumps(record['context'])} -> "
                          f"{json.dumps(record['text'])}", file=self.out, flush=True)
        finally:
            if handle is not None:
                handle.close()
        if _is_rank0():
            print(f"wrote {len(records)} samples to {path}", file=self.out, flush=True)
        return records

    def interactive(self, stream: IO[str]) -> int:
        count = 0
        if _is_rank0():
            print("enter a prompt per line (end with EOF / Ctrl-D)", file=self.out, flush=True)
        for line in _stdin_lines(stream):
            record = self.complete(line)
            count += 1
            if _is_rank0():
                print(record["text"], file=self.out, flush=True)
        return count

    def run(self, stdin: IO[str]) -> None:
        tg = self.cfg.textgen
        if tg.text_gen_type == "unconditional":
            self.write_records([""] * tg.num_samples)
        elif tg.text_gen_type == "input-file":
            if not tg.sample_input_file:
                raise ConfigError("sample_input_file: required by text_gen_type: input-file")
            self.write_records(read_prompts(tg.sample_input_file, tg.prompt_end))
        else:
            self.interactive(stdin)


def main(argv: list[str] | None = None, *, stdin: IO[str] | None = None,
         stdout: IO[str] | None = None) -> int:
    """generate.py: start up, load the checkpoint named by ``load``, generate."""
    from megatron.runtime import start

    rt = start(argv, purpose="generate")
    cfg, tokenizer = rt.cfg, rt.tokenizer
    out = stdout or sys.stdout
    log = (lambda msg: print(msg, file=out, flush=True)) if _is_rank0() else (lambda msg: None)
    model = load_inference_model(cfg, rt.state, rt.device, tracker=rt.tracker, log=log)
    if cfg.textgen.text_gen_type == "precompute":
        from megatron.training.post_training import precompute_reference_logps

        try:
            precompute_reference_logps(model, cfg, rt.state, tokenizer.eod, rt.device,
                                       write=rt.state.rank == 0, log=log)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"precompute: {exc}") from None
        return 0
    generator = TokenGenerator(model, rt.state, eod=tokenizer.eod,
                               vocab_size=tokenizer.vocab_size, seed=cfg.training.seed,
                               recompute=cfg.textgen.recompute)
    Session(cfg, generator, tokenizer, out).run(stdin or sys.stdin)
    return 0
