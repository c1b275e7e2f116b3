#!/usr/bin/env python
"""Convert a checkpoint of this framework into a Hugging Face model directory.

    python tools/ckpts/convert_neox_to_hf.py --input_dir checkpoints/global_step1000 \\
        --config_file configs/125M.yml configs/local_setup.yml --output_dir hf_model \\
        --architecture neox --precision auto

``--input_dir`` is a step directory (``global_stepN``) or a save directory (its ``latest``);
both layouts (plain ``mp_rank_*`` files or pipeline ``layer_*`` files) and any tensor-parallel
size are merged into full tensors. Without ``--config_file`` the checkpoint's own
``configs/merged.yml`` is used. Writes ``config.json``, ``generation_config.json``,
``model.safetensors`` (sharded above 5 GB) and, where the tokenizer has a Hugging Face form,
the tokenizer files. ``--architecture llama`` writes ``MistralForCausalLM`` when every layer is
a sliding-window layer. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron  # noqa: E402,F401  (CPU DeepSpeed accelerator before anything imports it)
from megatron.checkpoint_io import (  # noqa: E402
    expand_shared_layers,
    inspect_checkpoint,
    read_model_state_dict,
)
from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.neox_arguments import (  # noqa: E402
    ConfigError,
    NeoXConfig,
    RunFacts,
    load_config_files,
    resolve_config,
)
from tools.ckpts.hf_files import (  # noqa: E402
    PRECISIONS,
    cast,
    export_tokenizer,
    save_safetensors,
    special_token_ids,
)
from tools.ckpts.hf_model import (  # noqa: E402
    HF_CLASSES,
    ConversionError,
    export_architecture,
    hf_config,
    to_hf_state_dict,
)

AUTO_DTYPES = {"fp16": "fp16", "bfloat16": "bf16"}


def load_neox_config(files: list[str]) -> NeoXConfig:
    """The resolved config of ``files`` (a micro batch of 1 when they set none)."""
    merged = load_config_files(files)
    if not any(k in merged.values for k in ("train_micro_batch_size_per_gpu",
                                            "train_batch_size")):
        merged = merged.with_values({"train_micro_batch_size_per_gpu": 1}, "<converter>")
    values = merged.values
    world = max(int(values.get("pipe_parallel_size", 0) or 0), 1) * \
        int(values.get("model_parallel_size", 1) or 1)
    return resolve_config(merged, RunFacts(world_size=world, purpose=None, launching=False))


def convert(input_dir: str, output_dir: str, architecture: str, precision: str = "auto",
            config_files: list[str] | None = None) -> list[str]:
    """Write the HF model; returns the report lines."""
    info = inspect_checkpoint(input_dir)
    files = list(config_files or [])
    if not files:
        if not info.merged_config.is_file():
            raise ConversionError(f"{info.merged_config}: not found; pass --config_file")
        files = [str(info.merged_config)]
    cfg = load_neox_config(files)
    arch = export_architecture(cfg.model, architecture)
    state, info = read_model_state_dict(info.tag_dir, cfg.model)
    state = expand_shared_layers(state, cfg.model)
    vocab = int(state["embed.word_embeddings.weight"].shape[0])

    notes = [f"read {info.layout} checkpoint {info.tag_dir} (tensor parallel {info.tp_size}, "
             f"pipeline {info.pp_size}); vocabulary {vocab} rows"]
    tokenizer = None
    try:
        from megatron.tokenizer import build_tokenizer

        t = cfg.tokenizer
        tokenizer = build_tokenizer(t.tokenizer_type, vocab_file=t.vocab_file,
                                    merge_file=t.merge_file)
    except (OSError, ValueError) as exc:
        notes.append(f"warning: tokenizer not available ({exc}); no tokenizer files, "
                     "bos/eos ids unset")
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConversionError(f"tokenizer_type {cfg.tokenizer.tokenizer_type}: {tokenizer.vocab_size}"
                              f" tokens but the checkpoint has {vocab} vocabulary rows")
    special = special_token_ids(tokenizer) if tokenizer is not None else {}

    if precision == "auto":
        precision = AUTO_DTYPES.get(cfg.precision.precision or "fp32", "fp32")
    if precision not in PRECISIONS:
        raise ConversionError(f"--precision: {precision!r} is not one of auto, "
                              f"{', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg.model, arch, vocab_size=vocab, special=special, dtype=dtype)
    weights = cast(to_hf_state_dict(state, cfg.model, arch), dtype)
    written = save_safetensors(weights, out)
    config.save_pretrained(str(out))
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    notes.append(f"wrote {HF_CLASSES[arch]} ({precision}, {len(weights)} tensors in "
                 f"{', '.join(written)}) to {out}")
    if tokenizer is not None:
        notes.append(export_tokenizer(cfg.tokenizer, tokenizer, out))
    return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True,
                   help="checkpoint step directory (global_stepN) or save directory")
    p.add_argument("--config_file", nargs="+", default=None,
                   help="config files of the run (default: the checkpoint's configs/merged.yml)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--architecture", default="neox", choices=["neox", "llama", "mistral"])
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    args = p.parse_args(argv)
    try:
        notes = convert(args.input_dir, args.output_dir, args.architecture, args.precision,
                        args.config_file)
    except (ConversionError, CheckpointError, ConfigError) as exc:
        print(f"convert_neox_to_hf.py: error: {exc}", file=sys.stderr)
        return 2
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
