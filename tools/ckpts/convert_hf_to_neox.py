#!/usr/bin/env python
"""Convert a local Hugging Face GPT-NeoX / Pythia, Llama or Mistral model into a checkpoint
this framework trains, finetunes and generates from.

    python tools/ckpts/convert_hf_to_neox.py --hf_dir pythia-160m --output_dir ckpt/pythia \\
        --tp 2 --pp 0 [--config_out configs/pythia_converted.yml]

Writes ``<output_dir>/latest``, ``<output_dir>/global_step0/`` (the files DeepSpeed's engine
saves for the plain model with ``--pp 0``, or the pipeline layout for ``--pp N >= 1`` stages,
with the weights split over ``--tp`` tensor-parallel ranks, no optimizer state, plus
``manifest.json`` and ``configs/merged.yml``), the tokenizer under ``<output_dir>/tokenizer/``
and the model config (default ``<output_dir>/neox_config.yml``). Train from it with
``load: <output_dir>`` and ``finetune: true`` (fresh optimizer, iteration 0). Nothing is
downloaded: ``--hf_dir`` is a local directory. The conversion is
:mod:`megatron.conversion.hf_to_neox`; see docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron.checkpoint import CheckpointError
from megatron.conversion import ConversionError
from megatron.conversion.hf_files import PRECISIONS
from megatron.conversion.hf_to_neox import convert
from megatron.neox_arguments import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", required=True, help="local Hugging Face model directory")
    p.add_argument("--output_dir", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (model_parallel_size)")
    p.add_argument("--pp", type=int, default=0,
                   help="pipe_parallel_size: 0 plain layout, N >= 1 pipeline layout")
    p.add_argument("--config_out", default=None,
                   help="where to write the model config (default <output_dir>/neox_config.yml)")
    p.add_argument("--precision", default="fp32", choices=["auto", *PRECISIONS],
                   help="dtype of the written weights (auto: as stored in --hf_dir)")
    args = p.parse_args(argv)
    try:
        notes = convert(args.hf_dir, args.output_dir, args.tp, args.pp, args.config_out,
                        args.precision)
    except (ConversionError, CheckpointError, ConfigError) as exc:
        print(f"convert_hf_to_neox.py: error: {exc}", file=sys.stderr)
        return 2
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
