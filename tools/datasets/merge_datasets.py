"""Merge indexed datasets (or the shards of one preprocessing run) into one.

    python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

The logic lives in :mod:`megatron.data.preprocess.merge`.
"""

import sys

from megatron.data.preprocess.merge import main

if __name__ == "__main__":
    sys.exit(main())
