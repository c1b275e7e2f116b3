"""Post-training data into indexed datasets with label datasets (-100 = not trained on).

The logic lives in :mod:`megatron.data.preprocess.post_training`; ``--help`` lists the options.
"""

import sys

from megatron.data.preprocess.post_training import chat_main

if __name__ == "__main__":
    sys.exit(chat_main())
