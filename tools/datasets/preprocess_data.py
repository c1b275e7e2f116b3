"""Tokenize jsonl / text corpora into indexed datasets (``.bin`` + ``.idx``).

    python tools/datasets/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type HFTokenizer --vocab-file tokenizer.json --append-eod --workers 8

The logic lives in :mod:`megatron.data.preprocess.pipeline`; ``--help`` lists the options.
"""

import sys

from megatron.data.preprocess.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
