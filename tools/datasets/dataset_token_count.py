"""Count documents, sequences and tokens of indexed datasets.

    python tools/datasets/dataset_token_count.py data/a_text_document data/ [--json]

The logic lives in :mod:`megatron.data.preprocess.token_count`.
"""

import sys

from megatron.data.preprocess.token_count import main

if __name__ == "__main__":
    sys.exit(main())
