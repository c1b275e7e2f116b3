"""Prepare a named corpus for training: download (if needed), tokenize, index.

    python prepare_data.py --list
    python prepare_data.py pydocs                      # offline: Python's own documentation
    python prepare_data.py enwik8 -d ./data -t HFTokenizer -v tokenizer.json

Without ``-t`` a byte-level BPE (``--vocab-size``) is trained on the corpus first, so nothing
has to be downloaded for the offline corpora. Output lands in ``<data-dir>/<name>/``; the
script ends by printing the config keys (``data_path``, ``tokenizer_type``, ``vocab_file``)
to train on it. The corpus logic lives in ``tools/datasets/corpora.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools.datasets.corpora import CORPORA, CorpusError, prepare_corpus  # noqa: E402
from tools.datasets.preprocess_data import Interrupted  # noqa: E402


def _listing() -> str:
    width = max(len(c.name) for c in CORPORA)
    return "\n".join(f"  {c.name:<{width}}  {c.description}" for c in CORPORA)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="corpora:\n" + _listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", default="pydocs", help="corpus to prepare (default: pydocs)")
    p.add_argument("--list", action="store_true", help="list the corpora and exit")
    p.add_argument("-d", "--data-dir", default="./data", help="output root (default: ./data)")
    p.add_argument(
        "-t", "--tokenizer-type", default=None, help="use this tokenizer instead of training one"
    )
    p.add_argument("-v", "--vocab-file", default=None)
    p.add_argument("-m", "--merge-file", default=None)
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the trained BPE")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-docs", type=int, default=None, help="keep only the first N documents")
    p.add_argument("--url", default=None, help="download from this address instead")
    p.add_argument("--timeout", type=float, default=30.0, help="download timeout in seconds")
    p.add_argument("-f", "--force", action="store_true", help="download again even if present")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("corpora:\n" + _listing())
        return 0
    try:
        result = prepare_corpus(
            args.name,
            args.data_dir,
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            vocab_size=args.vocab_size,
            workers=args.workers,
            max_docs=args.max_docs,
            url=args.url,
            timeout=args.timeout,
            force=args.force,
            quiet=args.quiet,
        )
    except (CorpusError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt):
        print("interrupted; partial output removed", file=sys.stderr)
        return 130
    stats = result["stats"]
    print(
        f"{args.name}: {stats.documents} documents, {stats.total_tokens} tokens "
        f"({stats.seconds:.1f} s)\n"
        f"data_path: {result['data_path']}\n"
        f"tokenizer_type: {result['tokenizer_type']}\n"
        f"vocab_file: {result['vocab_file']}"
        + (f"\nmerge_file: {result['merge_file']}" if result["merge_file"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
