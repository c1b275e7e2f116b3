"""Prepare a named corpus for training: download (if needed), tokenize, index.

    python prepare_data.py --list
    python prepare_data.py pydocs                      # offline: Python's own documentation
    python prepare_data.py enwik8 -d ./data -t HFTokenizer -v tokenizer.json

Without ``-t`` a byte-level BPE (``--vocab-size``) is trained on the corpus first, so nothing
has to be downloaded for the offline corpora. Output lands in ``<data-dir>/<name>/``; the
script ends by printing the config keys (``data_path``, ``tokenizer_type``, ``vocab_file``)
to train on it. The corpus logic lives in ``megatron/data/preprocess/corpora.py``.
"""

from __future__ import annotations

import sys

from megatron.data.preprocess import corpora


def main(argv: list[str] | None = None) -> int:
    return corpora.main(argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
