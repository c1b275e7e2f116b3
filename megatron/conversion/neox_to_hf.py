"""A checkpoint of this framework as a Hugging Face model directory (command line:
``tools/ckpts/convert_neox_to_hf.py``).

:func:`convert` takes a step directory (``global_stepN``) or a save directory (its
``latest``); both layouts (plain ``mp_rank_*`` files or pipeline ``layer_*`` files) and any
tensor-parallel size are merged into full tensors. Without config files the checkpoint's own
``configs/merged.yml`` is used. Writes ``config.json``, ``generation_config.json``,
``model.safetensors`` (sharded above 5 GB) and, where the tokenizer has a Hugging Face form,
the tokenizer files. Architecture ``llama`` writes ``MistralForCausalLM`` when every layer is a
sliding-window layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron.checkpoint.weights import (
    expand_shared_layers,
    inspect_checkpoint,
    read_model_state_dict,
)
from megatron.conversion.hf_files import (
    PRECISIONS,
    cast,
    export_tokenizer,
    save_safetensors,
    special_token_ids,
)
from megatron.conversion.hf_mapping import (
    HF_CLASSES,
    ConversionError,
    export_architecture,
    hf_config,
    to_hf_state_dict,
)
from megatron.neox_arguments import (
    NeoXConfig,
    RunFacts,
    load_config_files,
    resolve_config,
)


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
        raise ConversionError(f"tokenizer_type {cfg.tokenizer.tokenizer_type}: "
                              f"{tokenizer.vocab_size} tokens but the checkpoint has {vocab} "
                              "vocabulary rows")
    special = special_token_ids(tokenizer) if tokenizer is not None else {}

    if precision == "auto":  # the training precision's dtype
        dtype = getattr(torch, cfg.params_dtype_name)
    elif precision in PRECISIONS:
        dtype = PRECISIONS[precision]
    else:
        raise ConversionError(f"--precision: {precision!r} is not one of auto, "
                              f"{', '.join(PRECISIONS)}")
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
