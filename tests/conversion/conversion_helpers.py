"""Tiny Hugging Face models, tokenizers, datasets and launches shared by the conversion tests.

Everything is built locally: a byte-level BPE tokenizer trained on the Python docs shipped with
the interpreter, random ``transformers`` models from configs, an indexed dataset written with
the framework's builder. Nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics)][:40]


def train_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    """A BPE ``tokenizer.json`` (eod ``<|endoftext|>`` = 0, ``<|padding|>`` = 1)."""
    from megatron.data.preprocess.tokenizer_training import train_bpe

    return Path(train_bpe(corpus(), vocab_size, out_dir)["tokenizer_json"])


def tokenizer_size(tokenizer_json: Path) -> int:
    from megatron.tokenizer import build_tokenizer

    return build_tokenizer("HFTokenizer", vocab_file=str(tokenizer_json)).vocab_size


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random values in every parameter (norm weights near 1, non-zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_hf_model(kind: str, out_dir: Path, tokenizer_json: Path, *, vocab_size: int,
                  seed: int = 0, **overrides: Any) -> Path:
    """Save a random ``kind`` (gpt_neox | llama | mistral | mixtral) causal LM with the
    tokenizer."""
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 64,
        "initializer_range": 0.1, "bos_token_id": 0, "eos_token_id": 0,
    }  # fmt: skip
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(**{"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **common, **overrides})
        cls = transformers.GPTNeoXForCausalLM
    elif kind == "llama":
        config = transformers.LlamaConfig(**{"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6,
            **common, **overrides})
        cls = transformers.LlamaForCausalLM
    elif kind == "mixtral":
        config = transformers.MixtralConfig(**{"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0}, "num_local_experts": 4,
            "num_experts_per_tok": 2, **common, **overrides})
        cls = transformers.MixtralForCausalLM
    else:
        config = transformers.MistralConfig(**{"rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0}, **common, **overrides})
        cls = transformers.MistralForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    perturb(model, seed + 1)
    model.save_pretrained(str(out_dir))
    hf_tokenizer(tokenizer_json).save_pretrained(str(out_dir))
    return out_dir


def hf_tokenizer(tokenizer_json: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|padding|>")


def load_hf(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True,
                                                 dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    return load_hf(hf_dir)(tokens).logits.float()


def neox_config(files: list[str | Path], **overrides: Any) -> Any:
    """The resolved config of ``files`` for tools and tests (no launch)."""
    from megatron.neox_arguments import RunFacts, load_config_files, resolve_config

    merged = load_config_files([str(f) for f in files])
    if overrides:
        merged = merged.with_values(overrides, "<test>")
    values = merged.values
    world = max(values.get("pipe_parallel_size", 0), 1) * values.get("model_parallel_size", 1)
    return resolve_config(merged, RunFacts(world_size=world, purpose=None, launching=False))


@torch.no_grad()
def neox_logits(ckpt: Path, config_files: list[str | Path], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint at ``ckpt`` with the plain model on one process (all shards
    merged)."""
    from megatron.checkpoint.weights import read_model_state_dict
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    cfg = neox_config(config_files, model_parallel_size=1, pipe_parallel_size=0)
    state, _ = read_model_state_dict(ckpt, cfg.model)
    vocab = int(state["embed.word_embeddings.weight"].shape[0])
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=vocab,
                     state=ParallelState.single())
    model.load_state_dict(state)
    return model.eval()(tokens).float()


def random_tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def write_dataset(prefix: Path, tokenizer_json: Path, repeat: int = 3) -> Path:
    """An indexed dataset of the corpus (each document + eod) at ``prefix``."""
    from megatron.data.indexed_dataset import (
        MMapIndexedDatasetBuilder,
        data_file_path,
        index_file_path,
    )
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("HFTokenizer", vocab_file=str(tokenizer_json))
    builder = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=np.int32)
    for _ in range(repeat):
        for doc in corpus():
            builder.add_document(tok.tokenize(doc) + [tok.eod])
    builder.finalize(index_file_path(prefix))
    return prefix


def run_script(*args: str | Path, cwd: Path = REPO_ROOT, timeout: float = 300,
               stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **OFFLINE_ENV)
    env.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def deepy(script: str, *args: str | Path, num_gpus: int = 1, timeout: float = 400,
          cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """``python deepy.py <script> ...`` on CPU ranks with a free rendezvous port."""
    return run_script(REPO_ROOT / "deepy.py", REPO_ROOT / script, *args, "--num_gpus",
                      str(num_gpus), "--master_port", str(free_port()), cwd=cwd, timeout=timeout)


def check_run(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def config_from_values(world_size: int = 1, **values: Any) -> Any:
    """A resolved config of a tiny model from key values (CharLevel tokenizer, vocab 512)."""
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
            "train_micro_batch_size_per_gpu": 1, "tokenizer_type": "CharLevelTokenizer",
            "make_vocab_size_divisible_by": 8, "pos_emb": "rotary"}
    merged = merge_configs([("test", {**base, **values})])
    cfg = resolve_config(merged, RunFacts(world_size=world_size, purpose=None, launching=False))
    return cfg.with_vocab_size(512)


def manual_state(tp_size: int, tp_rank: int) -> Any:
    """A ParallelState for building one tensor-parallel rank's shards without communication."""
    from megatron.parallel import ParallelState, RankTopology

    return ParallelState(topology=RankTopology(tp_size, tp_size, 1), rank=tp_rank,
                         tp_size=tp_size, tp_rank=tp_rank, pp_size=1, pp_rank=0, dp_size=1,
                         dp_rank=0)
