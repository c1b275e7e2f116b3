"""Files of a Hugging Face model directory: safetensors weights and tokenizers.

* :func:`save_safetensors` / :func:`load_hf_weights`: ``model.safetensors`` (or shards with
  ``model.safetensors.index.json`` above ``max_shard_bytes``); reading also takes
  ``pytorch_model.bin`` and its shards.
* :func:`export_tokenizer`: this framework's tokenizer (``HFTokenizer`` tokenizer.json,
  ``GPT2BPETokenizer``/``HFGPT2Tokenizer`` vocab + merges, ``SPMTokenizer`` model) saved so that
  ``AutoTokenizer.from_pretrained(dir)`` loads it.
* :func:`import_tokenizer`: copies an HF directory's tokenizer for this framework and returns
  the ``tokenizer_type`` / ``vocab_file`` / ``merge_file`` keys.
* :func:`vocab_divisor`: the ``make_vocab_size_divisible_by`` that pads a tokenizer's
  vocabulary to exactly the HF model's ``vocab_size``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron.conversion.hf_mapping import ConversionError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


# ------------------------------------------------------------------ weights
def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def save_safetensors(sd: Mapping[str, torch.Tensor], out_dir: Path,
                     max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write ``sd`` as safetensors (sharded with an index above ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def load_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory (safetensors or PyTorch bin, sharded or not)."""
    from safetensors.torch import load_file

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = hf_dir / index_name
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
            if index.is_file() else ([single] if (hf_dir / single).is_file() else [])
        if not files:
            continue
        out: dict[str, torch.Tensor] = {}
        for name in files:
            path = hf_dir / name
            if name.endswith(".safetensors"):
                out.update(load_file(str(path)))
            else:
                out.update(torch.load(path, map_location="cpu", weights_only=True))
        return out
    raise ConversionError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (sharded or not)")


# ------------------------------------------------------------------ vocabulary
def vocab_divisor(hf_vocab: int, tokenizer_vocab: int | None, tp: int) -> int:
    """``make_vocab_size_divisible_by`` for which a ``tokenizer_vocab``-token tokenizer pads to
    exactly ``hf_vocab`` with tensor parallel ``tp`` (the largest power of two up to 128 that
    works, else ``hf_vocab / tp``)."""
    n = tokenizer_vocab if tokenizer_vocab is not None else hf_vocab
    if n > hf_vocab:
        raise ConversionError(f"config.json: vocab_size {hf_vocab} is smaller than the "
                              f"tokenizer's {n} tokens")
    if hf_vocab % tp:
        raise ConversionError(f"config.json: vocab_size {hf_vocab} does not split over --tp {tp}")
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        multiple = d * tp
        if hf_vocab % multiple == 0 and hf_vocab - multiple < n:
            return d
    return hf_vocab // tp


# ------------------------------------------------------------------ tokenizer out
def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos / eos / pad ids for the HF config: eos is the end-of-document token; bos the first of
    ``<s>``, ``<|begin_of_text|>``, ... present (else eos); pad a padding token if present."""
    vocab: dict[str, int] = {}
    try:
        vocab = dict(tokenizer.vocab)
    except (NotImplementedError, AttributeError):
        pass
    eos = int(tokenizer.eod)
    bos = next((vocab[t] for t in BOS_CANDIDATES if t in vocab), eos)
    pad = next((vocab[t] for t in PAD_CANDIDATES if t in vocab), None)
    return {"bos": bos, "eos": eos, "pad": pad}


def _token_strings(tokenizer: Any, ids: Mapping[str, int | None]) -> dict[str, str]:
    inverse = {v: k for k, v in tokenizer.vocab.items()}
    names = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token"}
    return {names[k]: inverse[v] for k, v in ids.items() if v is not None and v in inverse}


def export_tokenizer(tok_args: Any, tokenizer: Any, out_dir: Path) -> str:
    """Save the tokenizer for ``AutoTokenizer``; returns what was written (or why not)."""
    kind = (tok_args.tokenizer_type or "").lower()
    ids = special_token_ids(tokenizer)
    try:
        if kind == "hftokenizer":
            from transformers import PreTrainedTokenizerFast

            hf_tok = PreTrainedTokenizerFast(tokenizer_file=tok_args.vocab_file,
                                             **_token_strings(tokenizer, ids))
        elif kind in ("gpt2bpetokenizer", "hfgpt2tokenizer"):
            from transformers import AutoTokenizer, GPT2TokenizerFast

            from megatron.tokenizer.tokenizer import gpt2_fast_from_files

            if Path(tok_args.vocab_file).is_dir():
                hf_tok = AutoTokenizer.from_pretrained(tok_args.vocab_file, local_files_only=True)
            else:
                hf_tok = gpt2_fast_from_files(GPT2TokenizerFast, tok_args.vocab_file,
                                               tok_args.merge_file)
                hf_tok.add_special_tokens(_token_strings(tokenizer, ids))  # type: ignore[arg-type]
        elif kind in ("spmtokenizer", "sentencepiecetokenizer"):
            from transformers import LlamaTokenizer

            shutil.copy(tok_args.vocab_file, out_dir / "tokenizer.model")
            hf_tok = LlamaTokenizer.from_pretrained(str(out_dir), local_files_only=True,
                                                    **_token_strings(tokenizer, ids))
        else:
            return f"no tokenizer files: {tok_args.tokenizer_type} has no Hugging Face form"
    except Exception as exc:  # the model is still written; the tokenizer is a convenience
        return f"tokenizer not exported ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    hf_tok.model_max_length = 1 << 30
    hf_tok.save_pretrained(str(out_dir))
    return f"tokenizer ({tok_args.tokenizer_type}) saved"


# ------------------------------------------------------------------ tokenizer in
def import_tokenizer(hf_dir: Path, out_dir: Path) -> tuple[dict[str, Any], Any | None, str]:
    """Copy ``hf_dir``'s tokenizer into ``out_dir/tokenizer/``: ``(config keys, tokenizer or
    None, message)``. tokenizer.json -> HFTokenizer; vocab.json + merges.txt ->
    GPT2BPETokenizer; tokenizer.model -> SPMTokenizer."""
    from megatron.tokenizer import TokenizerError, build_tokenizer

    dest = out_dir / "tokenizer"
    choices: list[tuple[str, list[str]]] = [
        ("HFTokenizer", ["tokenizer.json"]),
        ("GPT2BPETokenizer", ["vocab.json", "merges.txt"]),
        ("SPMTokenizer", ["tokenizer.model"]),
    ]
    problems = []
    for kind, files in choices:
        if not all((hf_dir / f).is_file() for f in files):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(hf_dir / f, dest / f)
        keys: dict[str, Any] = {"tokenizer_type": kind,
                                "vocab_file": str((dest / files[0]).resolve())}
        if len(files) > 1:
            keys["merge_file"] = str((dest / files[1]).resolve())
        try:
            tok = build_tokenizer(kind, vocab_file=keys["vocab_file"],
                                  merge_file=keys.get("merge_file"))
        except TokenizerError as exc:
            problems.append(f"{kind}: {exc}")
            continue
        return keys, tok, f"tokenizer {kind} from {', '.join(files)}"
    detail = "; ".join(problems) or "no tokenizer.json, vocab.json + merges.txt or tokenizer.model"
    return {}, None, f"no tokenizer copied ({detail}); set tokenizer_type and vocab_file yourself"
