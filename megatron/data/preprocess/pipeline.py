"""Tokenize jsonl / text corpora into indexed datasets (``.bin`` + ``.idx``).

    python tools/datasets/preprocess_data.py --input corpus.jsonl.zst,more.jsonl \\
        --output-prefix data/mydata --tokenizer-type HFTokenizer --vocab-file tokenizer.json \\
        --append-eod --workers 8

writes ``data/mydata_text_document.bin/.idx`` (one pair per ``--jsonl-keys`` key). Each input
record becomes one document of one sequence (``--append-eod`` adds the end-of-document
token). Inputs: ``.jsonl``/``.json`` (one object per line) and ``.txt`` (documents are
blank-line-separated paragraphs, or lines with ``--txt-mode line``), optionally ``.gz`` or
``.zst`` compressed; several files are comma-separated.

Streaming: records are read lazily in batches. A batch is parsed and handed whole to the
tokenizer library (``encoders``), whose own threads (``--workers`` of them) encode it without
the GIL while the main thread writes the previous batch; at most two batches are in flight,
so memory does not grow with the corpus. Tokenizers without a batch engine, and ``--ftfy``,
use a ``multiprocessing.Pool`` instead (``imap`` in input order). Documents keep input order
either way, so the output does not depend on ``--workers``.

Sharding: ``--num-shards N --shard-index I`` reads the I-th of N equal byte ranges of the
inputs (see ``text_inputs``) and writes ``PREFIX-0000I-of-0000N_{key}_document``; merging the
shards in index order (``merge_datasets.py``) gives the bytes of an unsharded run.

A record with invalid JSON, a missing key, a non-string value or an empty text is skipped
for every key (outputs of several keys stay aligned) and reported with its file and line.
Outputs are written under temporary names and renamed when complete: an interrupted run
(Ctrl-C, SIGTERM, a crash, even SIGKILL) never leaves an ``.idx`` that looks complete.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.data.preprocess.process_pool import (
    DocumentEncoder,
    EncoderOptions,
    PoolWorker,
    Throttle,
)
from megatron.data.preprocess.text_inputs import (
    BadRecord,
    InputError,
    Shard,
    check_keys_for_inputs,
    expand_inputs,
    input_kind,
    iter_records,
    parse_record,
)
from megatron.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    TokenizerError,
    build_tokenizer,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
    from megatron.data.preprocess.encoders import BatchEncoder

# numpy, the indexed dataset writer and the encoders are imported when work starts, so that
# ``--help`` and argument errors come back at once.
ENGINES = ("auto", "library", "processes")  # see megatron.data.preprocess.encoders
MAX_BAD_LISTED = 10


class Interrupted(BaseException):
    """Raised in the main process when a termination signal arrives during preprocessing (a
    BaseException, like KeyboardInterrupt: no per-record `except Exception` may swallow it)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


@dataclass
class PreprocessStats:
    documents: int = 0
    bad: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    engine: str = ""
    engine_note: str | None = None

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def rates(self) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            "docs_per_s": self.documents / s,
            "mb_per_s": self.bytes_read / 1e6 / s,
            "tokens_per_s": self.total_tokens / s,
        }


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


class _Progress:
    """A tqdm bar (documents/s, tokens/s, MB/s) on a terminal, a log line otherwise."""

    def __init__(self, total: int | None, log_interval: int, quiet: bool):
        self.log_interval = max(1, log_interval)
        self.quiet = quiet
        self.bar = None
        self.start = time.perf_counter()
        self._next_log = self.log_interval
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", dynamic_ncols=True, smoothing=0.1)

    def update(self, stats: PreprocessStats, n: int) -> None:
        if self.quiet or n == 0:
            return
        if self.bar is not None:
            self.bar.update(n)
        done = stats.documents + stats.bad
        if done < self._next_log:
            return
        self._next_log = (done // self.log_interval + 1) * self.log_interval
        r = _rates(stats, time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.set_postfix(
                MBps=f"{r['mb_per_s']:.2f}",
                tokps=f"{r['tokens_per_s']:.3g}",
                bad=stats.bad,
                refresh=False,
            )
        else:
            print(
                f"processed {done} records ({stats.bad} bad): {r['docs_per_s']:.1f} docs/s, "
                f"{r['mb_per_s']:.2f} MB/s, {r['tokens_per_s']:.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rates(stats: PreprocessStats, seconds: float) -> dict[str, float]:
    stats.seconds = seconds
    return stats.rates()


def _install_signal_handlers() -> dict[int, Any]:
    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[sig] = signal.signal(sig, handler)
    return old


# One result per record: ("ok" | "bad", file index, line, raw bytes, arrays per key | reason).
Result = tuple[str, int, int, int, Any]


class _BatchWork:
    """Parse a batch of records and encode all their texts in one library call."""

    def __init__(
        self,
        encoder: BatchEncoder,
        kinds: Sequence[str],
        keys: Sequence[str],
        eod: int | None,
    ):
        self.encoder = encoder
        self.kinds = kinds
        self.keys = tuple(keys)
        self.eod = eod
        import numpy as np

        self._np = np

    def _encode(self, texts: list[str]) -> list[Any]:
        try:
            return list(self.encoder.encode(texts))
        except Exception:  # find the failing texts one by one; the others still count
            out: list[Any] = []
            for t in texts:
                try:
                    out.append(self.encoder.encode([t])[0])
                except Exception as e:
                    out.append(f"{type(e).__name__}: {e}")
            return out

    def __call__(self, batch: list[tuple[int, int, bytes]]) -> list[Result]:
        nkeys = len(self.keys)
        texts: list[str] = []
        parsed: list[tuple[int, int, int, int | str]] = []
        for fi, lineno, raw in batch:
            try:
                record_texts = parse_record(self.kinds[fi], raw, self.keys)
            except BadRecord as e:
                parsed.append((fi, lineno, len(raw), str(e)))
                continue
            parsed.append((fi, lineno, len(raw), len(texts)))
            texts.extend(record_texts)
        encoded = self._encode(texts) if texts else []
        results: list[Result] = []
        for fi, lineno, nbytes, where in parsed:
            if isinstance(where, str):
                results.append(("bad", fi, lineno, nbytes, where))
                continue
            arrays = encoded[where : where + nkeys]
            reason = next((a for a in arrays if isinstance(a, str)), None)
            if reason is None:
                empty = next((k for k, a in zip(self.keys, arrays) if a.size == 0), None)
                if empty is not None:
                    reason = f"key {empty!r} tokenizes to nothing"
            if reason is not None:
                results.append(("bad", fi, lineno, nbytes, reason))
                continue
            if self.eod is not None:
                arrays = [self._np.append(a, self.eod) for a in arrays]
            results.append(("ok", fi, lineno, nbytes, arrays))
        return results


def _batches(
    records: Iterator[tuple[int, int, bytes]], max_records: int, max_bytes: int
) -> Iterator[list[tuple[int, int, bytes]]]:
    batch: list[tuple[int, int, bytes]] = []
    nbytes = 0
    for record in records:
        batch.append(record)
        nbytes += len(record[2])
        if len(batch) >= max_records or nbytes >= max_bytes:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _threaded_results(
    work: _BatchWork,
    records: Iterator[tuple[int, int, bytes]],
    batch_size: int,
    executor: ThreadPoolExecutor,
) -> Iterator[Result]:
    """Results in input order; the next batch is encoded while this one is written."""
    pending: deque = deque()
    for batch in _batches(records, batch_size, 8 << 20):
        pending.append(executor.submit(work, batch))
        if len(pending) >= 2:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def shard_output_prefix(output_prefix: str, shard: Shard | None) -> str:
    """``PREFIX-0000I-of-0000N`` for shard I of N (N > 1); ``PREFIX`` otherwise."""
    if shard is None or shard.count == 1:
        return output_prefix
    return f"{output_prefix}-{shard.index:05d}-of-{shard.count:05d}"


def preprocess(
    inputs: str | Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    *,
    keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    ftfy: bool = False,
    workers: int = 1,
    chunksize: int = 64,
    batch_size: int = 512,
    txt_mode: str = "paragraph",
    max_docs: int | None = None,
    num_docs: int | None = None,
    log_interval: int = 10000,
    quiet: bool = False,
    shard: Shard | None = None,
    engine: str = "auto",
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` for each key.

    With ``shard``, only that shard's records are read and ``output_prefix`` is used as
    given (see :func:`shard_output_prefix` for the conventional name).
    """
    from megatron.data.indexed_dataset import (
        MMapIndexedDatasetBuilder,
        best_fitting_dtype,
        data_file_path,
        index_file_path,
    )
    from megatron.data.preprocess.encoders import make_batch_encoder

    paths = expand_inputs(inputs)
    keys = tuple(keys)
    check_keys_for_inputs(paths, keys)
    tokenizer = build_tokenizer(tokenizer_type, vocab_file, merge_file)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    kinds = tuple(input_kind(p) for p in paths)
    batch_encoder, note = (None, None)
    if not ftfy:
        batch_encoder, note = make_batch_encoder(tokenizer, vocab_file, merge_file, workers, engine)
    prefixes = {k: output_prefix_for(output_prefix, k) for k in keys}
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    stats = PreprocessStats(tokens=dict.fromkeys(keys, 0))
    stats.engine = batch_encoder.name if batch_encoder else f"{workers} worker process(es)"
    stats.engine_note = note
    records: Iterator[tuple[int, int, bytes]] = iter_records(paths, txt_mode, shard)
    if max_docs is not None:
        records = itertools.islice(records, max_docs)

    old_handlers = _install_signal_handlers()
    builders: dict[str, MMapIndexedDatasetBuilder] = {}
    pool = None
    executor = None
    throttle = Throttle(max(1, workers) * chunksize * 4)
    progress = _Progress(num_docs, log_interval, quiet)
    try:
        builders = {
            k: MMapIndexedDatasetBuilder(data_file_path(p), dtype) for k, p in prefixes.items()
        }
        results: Iterator[Result]
        if batch_encoder is not None:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(1, thread_name_prefix="encode")
            eod = tokenizer.eod if append_eod else None
            work = _BatchWork(batch_encoder, kinds, keys, eod)
            results = _threaded_results(work, records, max(1, batch_size), executor)
        else:
            options = EncoderOptions(
                tokenizer_type=tokenizer_type,
                vocab_file=vocab_file,
                merge_file=merge_file,
                keys=keys,
                kinds=kinds,
                append_eod=append_eod,
                ftfy=ftfy,
                dtype=dtype.str,
            )
            if workers > 1:
                from multiprocessing import Pool

                pool = Pool(workers, initializer=PoolWorker.setup, initargs=(options,))
                results = pool.imap(PoolWorker.encode, throttle.wrap(records), chunksize)
            else:
                results = map(DocumentEncoder(options, tokenizer).encode, records)
        pending = 0
        for status, fi, lineno, nbytes, payload in results:
            if pool is not None:
                throttle.release()
            stats.bytes_read += nbytes
            if status == "ok":
                stats.documents += 1
                for key, arr in zip(keys, payload):
                    builders[key].add_item(arr)
                    builders[key].end_document()
                    stats.tokens[key] += arr.size
            else:
                stats.bad += 1
                if len(stats.bad_examples) < MAX_BAD_LISTED:
                    stats.bad_examples.append(f"{paths[fi]}:{lineno}: {payload}")
            pending += 1
            if pending >= 256:
                progress.update(stats, pending)
                pending = 0
        progress.update(stats, pending)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if stats.documents == 0:
            where = ", ".join(paths) + (f" (shard {shard.index} of {shard.count})" if shard else "")
            raise InputError(
                f"no usable documents in {where} ({stats.bad} bad records"
                + (f", first: {stats.bad_examples[0]})" if stats.bad_examples else ")")
            )
        for key, builder in builders.items():
            builder.finalize(index_file_path(prefixes[key]))
            stats.outputs[key] = prefixes[key]
    except BaseException:
        for sig in old_handlers:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        throttle.stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
            executor = None
        for builder in builders.values():
            builder.discard()
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        progress.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    stats.seconds = time.perf_counter() - progress.start
    return stats


def format_summary(stats: PreprocessStats) -> str:
    r = stats.rates()
    lines = [
        f"{stats.documents} documents, {stats.total_tokens} tokens, {stats.bad} bad records, "
        f"{stats.bytes_read / 1e6:.1f} MB in {stats.seconds:.1f} s "
        f"({r['docs_per_s']:.1f} docs/s, {r['mb_per_s']:.2f} MB/s, {r['tokens_per_s']:.0f} tokens/s)"
    ]
    if stats.engine:
        lines.append(f"  encoder: {stats.engine}")
    if stats.engine_note:
        lines.append(f"  note: {stats.engine_note}")
    for key, prefix in stats.outputs.items():
        lines.append(f"  {key}: {stats.tokens[key]} tokens -> {prefix}.bin/.idx")
    if stats.bad:
        lines.append(f"bad records (first {len(stats.bad_examples)} of {stats.bad}):")
        lines.extend(f"  {b}" for b in stats.bad_examples)
        if stats.bad > len(stats.bad_examples):
            lines.append(f"  ... and {stats.bad - len(stats.bad_examples)} more")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="comma-separated .jsonl/.txt files (.gz/.zst ok)")
    g.add_argument(
        "--jsonl-keys", nargs="+", default=["text"], help="keys to extract (default: text)"
    )
    g.add_argument(
        "--txt-mode",
        choices=["paragraph", "line"],
        default="paragraph",
        help=".txt documents: blank-line-separated paragraphs (default) or lines",
    )
    g.add_argument(
        "--num-docs", type=int, default=None, help="number of records, for the progress bar"
    )
    g.add_argument("--max-docs", type=int, default=None, help="stop after this many records")
    g.add_argument("--ftfy", action="store_true", help="fix mojibake with ftfy first")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES, type=_tokenizer_type)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--append-eod", action="store_true", help="end every document with eod")
    g.add_argument(
        "--tokenizer-engine",
        choices=ENGINES,
        default="auto",
        help="auto: byte-level BPE tokenizers run on tiktoken when that is exact (a probe "
        "text is checked); library: the tokenizer's own library, batched on its threads; "
        "processes: one document at a time in --workers processes (the pre-batching path)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dataset-impl", choices=["mmap"], default="mmap")
    g = p.add_argument_group("sharding (one slice of the input per node)")
    g.add_argument("--num-shards", type=int, default=1, help="split the input into N byte ranges")
    g.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="which range this run processes (0..N-1); output: PREFIX-0000I-of-0000N_*",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="encoding threads (or processes)")
    g.add_argument("--chunksize", type=int, default=64, help="records per worker-process task")
    g.add_argument("--batch-size", type=int, default=512, help="records per library batch")
    g.add_argument("--log-interval", type=int, default=10000)
    g.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _tokenizer_type(value: str) -> str:
    for name in TOKENIZER_TYPES:
        if name.lower() == value.lower():
            return name
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keys = [k for item in args.jsonl_keys for k in item.split(",") if k]
    if args.workers < 1:
        print(f"error: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        shard = Shard(args.shard_index, args.num_shards) if args.num_shards > 1 else None
        if args.num_shards <= 1 and args.shard_index != 0:
            shard = Shard(args.shard_index, args.num_shards)  # raises with the reason
        stats = preprocess(
            args.input,
            shard_output_prefix(args.output_prefix, shard),
            args.tokenizer_type,
            args.vocab_file,
            args.merge_file,
            keys=keys,
            append_eod=args.append_eod,
            ftfy=args.ftfy,
            workers=args.workers,
            chunksize=args.chunksize,
            batch_size=args.batch_size,
            txt_mode=args.txt_mode,
            max_docs=args.max_docs,
            num_docs=args.num_docs,
            log_interval=args.log_interval,
            quiet=args.quiet,
            shard=shard,
            engine=args.tokenizer_engine,
        )
    except Interrupted as e:
        print(f"interrupted by {e.signame}; partial output removed", file=sys.stderr)
        return 130 if e.signame == "SIGINT" else 143
    except (InputError, TokenizerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(stats))
    return 0
