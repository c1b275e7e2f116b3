"""Count documents, sequences and tokens of indexed datasets.

    python tools/datasets/dataset_token_count.py data/a_text_document data/b_text_document [--json]

Arguments are dataset prefixes (a trailing ``.bin``/``.idx`` is accepted) or directories,
whose ``*.idx`` datasets are all counted. Only the ``.idx`` files are read.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron.data.indexed_dataset import IndexedDatasetError, MMapIndexedDataset
from megatron.data.preprocess.merge import resolve_prefixes


def count_tokens(prefix: str) -> dict[str, object]:
    ds = MMapIndexedDataset(prefix)
    return {
        "prefix": prefix,
        "documents": ds.num_documents,
        "sequences": len(ds),
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("prefixes", nargs="+", help="dataset prefixes or directories")
    p.add_argument("--json", action="store_true", help="print one JSON object per dataset")
    args = p.parse_args(argv)
    try:
        rows = [count_tokens(pfx) for pfx in resolve_prefixes(args.prefixes)]
    except (IndexedDatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(str(r["prefix"])) for r in rows)
    print(f"{'dataset':<{width}}  {'documents':>12}  {'sequences':>12}  {'tokens':>15}  dtype")
    for r in rows:
        print(
            f"{r['prefix']:<{width}}  {r['documents']:>12}  {r['sequences']:>12}  {r['tokens']:>15}  {r['dtype']}"
        )
    if len(rows) > 1:
        total_docs = sum(int(r["documents"]) for r in rows)
        total_seqs = sum(int(r["sequences"]) for r in rows)
        total_toks = sum(int(r["tokens"]) for r in rows)
        print(f"{'total':<{width}}  {total_docs:>12}  {total_seqs:>12}  {total_toks:>15}")
    return 0
