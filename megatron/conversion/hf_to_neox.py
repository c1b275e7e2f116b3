"""A local Hugging Face GPT-NeoX / Pythia, Llama or Mistral model as a checkpoint this framework
trains, finetunes and generates from (command line: ``tools/ckpts/convert_hf_to_neox.py``).

:func:`convert` writes ``<output_dir>/latest``, ``<output_dir>/global_step0/`` (the files
DeepSpeed's engine saves for the plain model with ``pp`` 0, or the pipeline layout for ``pp >=
1`` stages, with the weights split over ``tp`` tensor-parallel ranks, no optimizer state, plus
``manifest.json`` and ``configs/merged.yml``), the tokenizer under ``<output_dir>/tokenizer/``
and the model config (default ``<output_dir>/neox_config.yml``). Train from it with
``load: <output_dir>`` and ``finetune: true`` (fresh optimizer, iteration 0). Nothing is
downloaded: ``hf_dir`` is a local directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megatron.checkpoint.weights import write_checkpoint
from megatron.conversion.hf_files import (
    PRECISIONS,
    cast,
    import_tokenizer,
    load_hf_weights,
    vocab_divisor,
)
from megatron.conversion.hf_mapping import (
    ConversionError,
    from_hf_state_dict,
    neox_values_from_hf,
)
from megatron.neox_arguments import (
    ConfigError,
    NeoXConfig,
    RunFacts,
    merge_configs,
    resolve_config,
)

HEADER = """\
# Model converted from the Hugging Face model in {hf_dir}.
# Merge it first, then the data / training configs (later files win):
#   python deepy.py train.py {config} configs/my_training.yml --finetune true
# The checkpoint has no optimizer state: load it with finetune: true (or no_load_optim: true).
"""


def read_hf_config(hf_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"{hf_dir / 'config.json'}: not found (a local Hugging Face model "
                              "directory is needed)")
    try:
        return AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ConversionError(f"{hf_dir / 'config.json'}: {str(exc).splitlines()[0]}") from None


def model_config_values(hf: Any, tokenizer_keys: dict[str, Any], tokenizer_vocab: int | None,
                        tp: int, pp: int, load_dir: Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, config keys)`` of the converted model."""
    arch, values = neox_values_from_hf(hf)
    values["make_vocab_size_divisible_by"] = vocab_divisor(int(hf.vocab_size), tokenizer_vocab,
                                                           tp)
    values.update(model_parallel_size=tp, pipe_parallel_size=pp)
    values.update(tokenizer_keys)
    values.update(load=str(load_dir.resolve()), train_micro_batch_size_per_gpu=1)
    return arch, values


def resolve_values(values: dict[str, Any], origin: str) -> NeoXConfig:
    merged = merge_configs([(origin, values)])
    world = max(values["pipe_parallel_size"], 1) * values["model_parallel_size"]
    return resolve_config(merged, RunFacts(world_size=world, purpose=None, launching=False))


def convert(hf_dir: str, output_dir: str, tp: int = 1, pp: int = 0,
            config_out: str | None = None, precision: str = "fp32") -> list[str]:
    """Write the checkpoint and config; returns the report lines."""
    if tp < 1 or pp < 0:
        raise ConversionError(f"--tp {tp} / --pp {pp}: need tp >= 1 and pp >= 0")
    src, out = Path(hf_dir), Path(output_dir)
    if not src.is_dir():
        raise ConversionError(f"{src}: Hugging Face model directory not found")
    hf = read_hf_config(src)
    out.mkdir(parents=True, exist_ok=True)
    tok_keys, tokenizer, tok_note = import_tokenizer(src, out)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    arch, values = model_config_values(hf, tok_keys, vocab, tp, pp, out)
    config_path = Path(config_out) if config_out else out / "neox_config.yml"
    try:
        cfg = resolve_values(values, str(config_path))
    except ConfigError as exc:
        raise ConversionError(f"the converted config is not valid here: {exc}") from None
    if vocab is not None and cfg.with_vocab_size(vocab).tokenizer.padded_vocab_size \
            != hf.vocab_size:
        raise ConversionError(f"config.json: vocab_size {hf.vocab_size} cannot be reached by "
                              f"padding {vocab} tokens")

    weights = from_hf_state_dict(load_hf_weights(src), cfg.model, arch)
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConversionError(f"--precision: {precision!r} is not one of auto, "
                                  f"{', '.join(PRECISIONS)}")
        weights = cast(weights, PRECISIONS[precision])
    text = HEADER.format(hf_dir=src.resolve(), config=config_path) + \
        yaml.safe_dump(values, sort_keys=False)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text)
    tag_dir = write_checkpoint(out, weights, cfg.model, tp_size=tp, pipe_parallel_size=pp,
                               config_yaml=text)
    layout = f"pipeline layout, {pp} stage(s)" if pp else "plain layout"
    return [
        f"read {hf.model_type} model from {src} ({len(weights)} tensors, vocabulary "
        f"{hf.vocab_size}, make_vocab_size_divisible_by {values['make_vocab_size_divisible_by']})",
        tok_note,
        f"wrote checkpoint {tag_dir} ({layout}, tensor parallel {tp})",
        f"wrote config {config_path}",
    ]
