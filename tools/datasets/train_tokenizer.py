"""Train a byte-level BPE or SentencePiece tokenizer on jsonl / text files.

    python tools/datasets/train_tokenizer.py --input data.jsonl --vocab-size 8192 --output-dir tok/

The logic lives in :mod:`megatron.data.preprocess.tokenizer_training`.
"""

import sys

from megatron.data.preprocess.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
