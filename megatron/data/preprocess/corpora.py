"""Named corpora that ``prepare_data.py`` can fetch, tokenize and index.

Each corpus yields plain-text documents. :func:`prepare_corpus` writes them to
``<data_dir>/<name>/<name>.jsonl``, trains a byte-level BPE tokenizer on them into
``<data_dir>/<name>/tokenizer/`` unless a tokenizer is given, and preprocesses the jsonl
into ``<data_dir>/<name>/<name>_text_document.{bin,idx}`` with eod appended.

Corpora:

* ``pydocs`` (offline) -- text shipped with Python itself: the pydoc help topics
  (``pydoc_data.topics``) followed by one document per standard-library module made of its
  module, class and function docstrings (read with ``ast``, nothing is imported). About 2 MB.
* ``enwik8`` (download) -- the first 10^8 bytes of an English Wikipedia XML dump; one
  document per page.
* ``tinyshakespeare`` (download) -- about 1 MB of Shakespeare; one document per speech.

A failed download raises :class:`CorpusError` with a one-line reason.
"""

from __future__ import annotations

import argparse
import ast
import html
import io
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron.data.preprocess.pipeline import Interrupted, PreprocessStats, preprocess
from megatron.data.preprocess.tokenizer_training import train_bpe


class CorpusError(RuntimeError):
    """A corpus cannot be prepared (unknown name, download failure)."""


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    documents: Callable[[Path | None], Iterator[str]]
    url: str | None = None

    @property
    def offline(self) -> bool:
        return self.url is None


_SKIP_STDLIB_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "__pycache__",
}


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_STDLIB_DIRS or part.startswith("idle_test") for part in rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        yield module, path


def _module_document(module: str, path: Path) -> str | None:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                child_doc = ast.get_docstring(child)
                if child_doc:
                    parts.append(f"{name}\n    {child_doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, f"{name}.")

    visit(tree, f"{module}.")
    return "\n\n".join(parts) if parts else None


def pydocs_documents(_raw: Path | None = None) -> Iterator[str]:
    """Python's help topics, then standard-library docstrings, one module per document."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text
    for module, path in _stdlib_files():
        doc = _module_document(module, path)
        if doc:
            yield doc


def enwik8_documents(raw: Path | None) -> Iterator[str]:
    """One document per ``<page>``: the unescaped article text."""
    assert raw is not None
    with zipfile.ZipFile(raw) as zf, zf.open("enwik8") as member:
        lines: list[str] = []
        in_text = False
        for line in io.TextIOWrapper(member, encoding="utf-8", errors="replace"):
            if "<text" in line:
                in_text = True
                line = re.sub(r"^.*?<text[^>]*>", "", line)
            if in_text:
                end = line.find("</text>")
                if end >= 0:
                    lines.append(line[:end])
                    in_text = False
                else:
                    lines.append(line)
            if "</page>" in line:
                text = html.unescape("".join(lines)).strip()
                lines = []
                if text:
                    yield text


def paragraph_documents(raw: Path | None) -> Iterator[str]:
    """Blank-line-separated paragraphs of a UTF-8 text file."""
    assert raw is not None
    para: list[str] = []
    with open(raw, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\n")
                para = []
    if para:
        yield "".join(para).rstrip("\n")


CORPORA: tuple[Corpus, ...] = (
    Corpus(
        "pydocs",
        "Python's bundled help topics and standard-library docstrings (offline, ~2 MB)",
        pydocs_documents,
    ),
    Corpus(
        "enwik8",
        "first 100 MB of an English Wikipedia XML dump, one document per page (download, 36 MB)",
        enwik8_documents,
        url="http://mattmahoney.net/dc/enwik8.zip",
    ),
    Corpus(
        "tinyshakespeare",
        "about 1 MB of Shakespeare, one document per speech (download)",
        paragraph_documents,
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    ),
)


def get_corpus(name: str) -> Corpus:
    for corpus in CORPORA:
        if corpus.name == name:
            return corpus
    raise CorpusError(f"unknown corpus {name!r} (available: {', '.join(c.name for c in CORPORA)})")


def download(url: str, dest: Path, *, timeout: float = 30.0, name: str = "") -> Path:
    """Fetch ``url`` to ``dest`` (via a temporary file); one-line :class:`CorpusError` on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if tmp.exists():
            tmp.unlink()
        reason = getattr(e, "reason", None) or e
        raise CorpusError(
            f"could not download {name or url} from {url}: {reason}; without network access, "
            f"place the file at {dest} yourself or use an offline corpus (pydocs)"
        ) from None
    os.replace(tmp, dest)
    return dest


def write_jsonl(documents: Iterator[str], path: Path, max_docs: int | None = None) -> int:
    """Write ``{"text": doc}`` lines atomically; returns the number of documents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in itertools.islice(documents, max_docs):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return n


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def prepare_corpus(
    name: str,
    data_dir: str | os.PathLike = "data",
    *,
    tokenizer_type: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int = 8192,
    workers: int = 1,
    max_docs: int | None = None,
    url: str | None = None,
    timeout: float = 30.0,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fetch (if needed), tokenize and index corpus ``name``; returns what was written."""
    corpus = get_corpus(name)
    out_dir = Path(data_dir) / corpus.name
    raw = None
    source = url or corpus.url
    if source is not None:
        raw = out_dir / "raw" / os.path.basename(source.rstrip("/"))
        if force or not raw.exists():
            download(source, raw, timeout=timeout, name=corpus.name)
    jsonl = out_dir / f"{corpus.name}.jsonl"
    num_docs = write_jsonl(corpus.documents(raw), jsonl, max_docs)
    if num_docs == 0:
        raise CorpusError(f"corpus {corpus.name} produced no documents")
    result: dict[str, Any] = {"jsonl": str(jsonl), "documents": num_docs}
    if tokenizer_type is None:
        files = train_bpe(_jsonl_texts(jsonl), vocab_size, out_dir / "tokenizer")
        tokenizer_type, vocab_file, merge_file = "HFTokenizer", files["tokenizer_json"], None
        result["trained_tokenizer"] = files
    result.update(tokenizer_type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
    stats: PreprocessStats = preprocess(
        str(jsonl),
        str(out_dir / corpus.name),
        tokenizer_type,
        vocab_file,
        merge_file,
        append_eod=True,
        workers=workers,
        num_docs=num_docs,
        quiet=quiet,
    )
    result["data_path"] = stats.outputs["text"]
    result["stats"] = stats
    return result


def _listing() -> str:
    width = max(len(c.name) for c in CORPORA)
    return "\n".join(f"  {c.name:<{width}}  {c.description}" for c in CORPORA)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description or __doc__,
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


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """The ``prepare_data.py`` command line."""
    args = build_parser(description).parse_args(argv)
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
