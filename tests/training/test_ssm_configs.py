"""GPT-NeoX's Mamba, RWKV and gMLP example configs (copies under fixtures/): they load, and
scaled down (same keys, small sizes) they learn on the bundled corpus -- a mixed Mamba / RWKV /
gMLP model from the Mamba example, and the RWKV and gMLP examples alone, each for 20 steps
through ``deepy.py train.py``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import base_values, build_char_corpus, explain, records, run_deepy, write_config

from megatron.neox_arguments import ConfigError, RunFacts, load_config_files, resolve_config

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MAMBA, RWKV, GMLP = (str(FIXTURES / n) for n in ("mamba-130M.yml", "rwkv-430M.yml",
                                                  "gmlp_small.yml"))
SMALL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
         "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 4}
ADAM = {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1.0e-8}}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and on a shared machine spinning OpenMP
    workers only slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resolve(files: list[str], **values: Any) -> Any:
    merged = load_config_files(files)
    if values:
        merged = merged.with_values(values, "<scaled down>")
    return resolve_config(merged, RunFacts(world_size=1, purpose=None, launching=False))


def test_the_example_configs_load() -> None:
    mamba = _resolve([MAMBA], train_micro_batch_size_per_gpu=1).model
    assert mamba.attention_config == [[["mamba"], 24]] and mamba.mamba_inner_func_fusion
    assert (mamba.norm, mamba.hidden_size) == ("rmsnorm", 768)
    rwkv = _resolve([RWKV])
    assert rwkv.model.attention_config == [[["rwkv"], 24]]
    assert rwkv.parallelism.pipe_parallel_size == 1
    # GPT-NeoX's gMLP example writes its Adam eps as 1.0e_8, which YAML reads as a string (it
    # never reaches a GPT-NeoX optimizer either): one line naming it; with a number it loads
    with pytest.raises(ConfigError, match=r"optimizer: params.eps must be a number, got "
                                          r"'1.0e_8'"):
        _resolve([GMLP])
    gmlp = _resolve([GMLP], optimizer=ADAM).model
    assert gmlp.attention_config == [[["gmlp"], "all"]] and gmlp.gmlp_attn_dim == 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"))


def test_a_mixed_scaled_down_model_trains_through_deepy(corpus, tmp_path) -> None:
    """The Mamba example (its fusion keys on: a notice, then the pure PyTorch path) with one
    layer of each family."""
    run = tmp_path / "run"
    small = write_config(tmp_path / "small.yml", base_values(
        corpus, run, **{**SMALL, "num_layers": 3}, train_iters=20, optimizer=ADAM,
        attention_config=[[["mamba", "rwkv", "gmlp"], 3]], pos_emb="none",
        num_cpu_threads_per_rank=1,
    ))  # fmt: skip
    proc = run_deepy(MAMBA, small)
    assert proc.returncode == 0, explain(proc)
    assert "[mamba] mamba_*_fusion is set" in proc.stderr + proc.stdout
    loss = [r["lm_loss"] for r in records(run)]
    assert len(loss) == 20 and all(math.isfinite(x) for x in loss)
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 0.5, loss


@pytest.mark.parametrize("family, files", [("rwkv", [RWKV]), ("gmlp", [GMLP])])
def test_the_other_scaled_down_examples_train_through_deepy(corpus, tmp_path, family: str,
                                                           files: list[str]) -> None:
    """The RWKV and gMLP examples alone, scaled down. Their schedule is scaled with the run:
    both files set ``lr_decay_iters: 320000`` with ``warmup: 0.01``, which is 3200 warmup
    iterations (GPT-NeoX's rule: a fraction of ``lr_decay_iters``), so 20 steps at the file's
    own decay length would never leave the first percent of the warmup and the loss would
    stay flat."""
    run = tmp_path / "run"
    small = write_config(tmp_path / "small.yml", base_values(
        corpus, run, **SMALL, train_iters=20, lr_decay_iters=20, optimizer=ADAM,
        attention_config=[[[family], 2]], bf16={"enabled": False}, fp16={"enabled": False},
        distributed_backend="gloo", num_cpu_threads_per_rank=1,
    ))  # fmt: skip
    proc = run_deepy(*files, small)
    assert proc.returncode == 0, explain(proc)
    loss = [r["lm_loss"] for r in records(run)]
    assert len(loss) == 20 and all(math.isfinite(x) for x in loss)
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < first - 0.5, (family, loss)


@pytest.mark.parametrize("name, value", [("te_mha", True), ("te_layernorm_mlp", True),
                                         ("te_fp8_margin", 1)])
def test_te_keys_without_transformer_engine_stop_in_one_line(name: str, value: Any) -> None:
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:  # accepted by the schema
        assert getattr(_resolve([MAMBA], train_micro_batch_size_per_gpu=1, **{name: value})
                       .precision, name) == value
        return
    with pytest.raises(ConfigError) as err:
        _resolve([MAMBA], train_micro_batch_size_per_gpu=1, **{name: value})
    message = str(err.value)
    assert "\n" not in message and f"{name}: " in message
    assert "need" in message and "transformer_engine package" in message
    assert "GPU ranks" in message


def test_nccl_from_a_gpt_neox_config_stops_a_cpu_launch_in_one_line() -> None:
    merged = load_config_files([RWKV])
    with pytest.raises(ConfigError) as err:
        resolve_config(merged, RunFacts(world_size=1, gpu=False, launching=True, purpose=None))
    assert str(err.value) == (f"{RWKV}: distributed_backend: nccl needs GPUs, and the ranks of "
                              "this launch are CPU ranks; use gloo (or leave it unset)")
