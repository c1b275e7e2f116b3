"""Merge several indexed datasets into one.

    python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

``--input`` takes dataset prefixes (several, or comma-separated) or a directory, whose
``*.idx`` datasets are merged in sorted order. All inputs must share one element dtype. The
data files are streamed in fixed-size chunks, so memory stays small whatever their size; the
index keeps 12 bytes per sequence. The result is written under temporary names and renamed
when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)


def resolve_prefixes(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes from prefixes, comma lists and directories (sorted ``*.idx``)."""
    out: list[str] = []
    for item in inputs:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                found = sorted(str(p)[: -len(".idx")] for p in Path(part).glob("*.idx"))
                if not found:
                    raise IndexedDatasetError(f"directory {part} contains no .idx files")
                out.extend(found)
            else:
                if part.endswith((".bin", ".idx")):
                    part = part[:-4]
                out.append(part)
    if not out:
        raise IndexedDatasetError("no input datasets given")
    return out


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> MMapIndexedDataset:
    """Concatenate ``prefixes`` (documents in order) into ``output_prefix``."""
    datasets = [MMapIndexedDataset(p) for p in prefixes]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({ds.dtype})" for p, ds in zip(prefixes, datasets))
        raise IndexedDatasetError(f"cannot merge datasets with different dtypes: {listing}")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise IndexedDatasetError(f"output prefix {output_prefix} is also an input")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = MMapIndexedDatasetBuilder(data_file_path(output_prefix), dtype=datasets[0].dtype)
    with builder:
        for p in prefixes:
            builder.merge_file_(p)
        builder.finalize(index_file_path(output_prefix))
    return MMapIndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or a directory")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    try:
        prefixes = resolve_prefixes(args.input)
        merged = merge_datasets(prefixes, args.output_prefix)
    except (IndexedDatasetError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: "
        f"{merged.num_documents} documents, {len(merged)} sequences, {merged.num_tokens} tokens "
        f"({merged.dtype})"
    )
    return 0
