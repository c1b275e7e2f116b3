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
a sliding-window layer. The conversion is :mod:`megatron.conversion.neox_to_hf`; see
docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron.checkpoint import CheckpointError
from megatron.conversion import ConversionError
from megatron.conversion.hf_files import PRECISIONS
from megatron.conversion.neox_to_hf import convert
from megatron.neox_arguments import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_dir", required=True,
                   help="checkpoint step directory (global_stepN) or save directory")
    p.add_argument("--config_file", nargs="+", default=None,
                   help="config files of the run (default: the checkpoint's configs/merged.yml)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--architecture", default="neox",
                   choices=["neox", "llama", "mistral", "mamba", "mixtral"])
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
