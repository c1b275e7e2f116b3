"""torch_compile and fp8_training on CPU: compiled layers give the eager losses and
gradients, FP8 products (emulated) stay close, the config refusals are one line, and
``make test-gpu`` on a machine without a GPU runs nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron.model import lm_loss
from megatron.neox_arguments import ConfigError
from megatron.parallel import ParallelState
from megatron.parallel.layers import ColumnParallelLinear
from megatron.training.compile import (
    Float8Matmul,
    compile_layers,
    convert_to_float8,
    is_compiled,
    require_fp8_device,
)
from tests.model.gpt_model_helpers import REPO_ROOT, batch, build, make_config
from tests.training.e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    losses,
    run_deepy,
    write_config,
)

REORDER_TOLERANCE = 1e-5  # fp32: compiled kernels only reorder sums


def _losses_and_grads(model, steps=2):
    state = ParallelState.single()
    tokens, labels, mask = batch()
    model.train()
    out = []
    for _ in range(steps):
        loss = lm_loss(model(tokens), labels, mask, state)
        loss.backward()
        out.append(loss.item())
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_compiled_layers_match_eager(ckpt):
    cfg = make_config(num_layers=2, checkpoint_activations=ckpt)
    ref_loss, ref_grads = _losses_and_grads(build(cfg))
    model = build(cfg)
    keys = list(model.state_dict())
    assert compile_layers(model) == 2
    assert all(is_compiled(layer) for layer in model.layers)
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    loss, grads = _losses_and_grads(model)
    assert loss == pytest.approx(ref_loss, rel=REORDER_TOLERANCE)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)


def _tp2_compiled_vs_eager(rank: int, world: int) -> tuple[list[float], list[float]]:
    from megatron.neox_arguments import padded_vocab_size
    from megatron.parallel import RankTopology

    state = ParallelState.initialize(RankTopology(2, 2, 1))
    cfg = make_config(world_size=2, num_layers=2, model_parallel_size=2)
    vocab = padded_vocab_size(100, cfg.model.make_vocab_size_divisible_by, 2)
    tokens, labels, mask = batch(2, 16, seed=7)
    out = []
    for compiled in (False, True):
        model = build(cfg, seed=11, state=state, padded_vocab=vocab)
        if compiled:
            compile_layers(model)
        losses = []
        for _ in range(2):
            loss = lm_loss(model(tokens), labels, mask, state)
            loss.backward()
            losses.append(loss.item())
        out.append(losses)
    return out[0], out[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_layers_under_tensor_parallelism():
    from tests.distributed import run_distributed

    for eager, compiled in run_distributed(_tp2_compiled_vs_eager, 2, timeout=900):
        assert compiled == pytest.approx(eager, rel=REORDER_TOLERANCE)


def test_fp8_products_emulated_close_to_fp32():
    cfg = make_config(num_layers=2, no_weight_tying=True)
    ref_loss, _ = _losses_and_grads(build(cfg), steps=1)
    model = build(cfg)
    converted = convert_to_float8(model, "tensorwise", emulate=True)
    assert converted == [f"layers.{i}.{name}" for i in range(2) for name in (
        "attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h")]
    assert isinstance(model.layers[0].mlp.dense_h_to_4h.linear_impl, Float8Matmul)
    # the logits stay in high precision
    assert isinstance(model.output_layer, ColumnParallelLinear)
    assert "linear_impl" not in model.output_layer.__dict__
    (loss,), grads = _losses_and_grads(model, steps=1)
    assert loss != ref_loss[0]  # the products really went through float8
    assert loss == pytest.approx(ref_loss[0], rel=2e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())


NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # CPU ranks even where a GPU is present


def test_fp8_refused_on_cpu_rank(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(ConfigError) as err:
        require_fp8_device()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("fp8_training: this rank computes on CPU has no FP8 tensor cores")


@pytest.mark.parametrize("values,fragment", [
    ({"torch_compile": True, "pipe_parallel_size": 1}, "torch_compile: is not implemented for "
     "pipeline parallelism"),
    ({"torch_compile": True, "zero_optimization": {"stage": 3}}, "with ZeRO stage 3"),
    ({"fp8_training": True}, "fp8_training: needs bf16"),
    ({"fp8_training": True, "bf16": {"enabled": True}, "seq_length": 15, "max_position_embeddings":
      15, "train_micro_batch_size_per_gpu": 1}, "micro batch x seq_length = 15) to be a multiple"),
    ({"te_fp8_format": "e4m3"}, "te_fp8_format: Transformer Engine FP8 (delayed scaling) is "
     "not provided and is not mapped"),
    ({"te_columnparallel": True}, "te_columnparallel: Transformer Engine layers are not"),
])
def test_config_refusals(values, fragment):
    with pytest.raises(ConfigError) as err:
        make_config(**values)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_compile_in_bf16_refused_on_cpu_ranks():
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
    from tests.model.gpt_model_helpers import BASE

    values = {**BASE, "torch_compile": True, "bf16": {"enabled": True}, "data_path": "nowhere",
              "train_iters": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ConfigError) as err:
        resolve_config(merge_configs([("c.yml", values)]), RunFacts(gpu=False, purpose="train"))
    assert str(err.value).startswith("c.yml: torch_compile: on CPU ranks needs fp32")
    on_gpus = resolve_config(merge_configs([("c.yml", values)]),
                             RunFacts(gpu=True, purpose="train", launching=False))
    assert not any("torch_compile" in w for w in on_gpus.warnings)


def test_compile_keys_accepted():
    cfg = make_config(torch_compile=True, bf16={"enabled": True}, fp8_training=True,
                      fp8_recipe="rowwise")
    assert cfg.precision.torch_compile and cfg.precision.fp8_training
    assert cfg.precision.fp8_recipe == "rowwise"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("compile_data"), max_docs=60)


def _tiny(data, run, **extra):
    return write_config(run / "c.yml", base_values(data, run, **{
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32,
        "max_position_embeddings": 32, "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "train_iters": 4,
        "lr_decay_style": "constant", "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "seed": 7, **extra}))


@pytest.mark.slow
def test_deepy_compiled_run_matches_eager(data, tmp_path):
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        run = tmp_path / name
        run.mkdir()
        proc = run_deepy(_tiny(data, run, torch_compile=compiled), timeout=900, env=NO_GPU)
        assert proc.returncode == 0, explain(proc)
        runs[name] = losses(run)
    assert sorted(runs["compiled"]) == [1, 2, 3, 4]
    for it, loss in runs["eager"].items():
        assert runs["compiled"][it] == pytest.approx(loss, rel=REORDER_TOLERANCE)


@pytest.mark.slow
def test_deepy_refuses_fp8_on_cpu_in_one_line(data, tmp_path):
    proc = run_deepy(_tiny(data, tmp_path, fp8_training=True, bf16={"enabled": True}),
                     timeout=300, env=NO_GPU)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "fp8_training" in line]
    assert len(lines) == 1, explain(proc)
    assert "needs GPUs with FP8 tensor cores" in lines[0]
    assert "Traceback" not in proc.stderr


def test_make_test_gpu_runs_nothing_without_a_gpu():
    proc = subprocess.run(["make", "-s", "test-gpu", f"GPU_PY={sys.executable}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **NO_GPU})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert "nothing was run" in proc.stdout
    assert "passed" not in proc.stdout and "pytest" not in proc.stdout


def test_torch_compile_mode_reaches_each_layer(monkeypatch) -> None:
    from torch import nn

    from megatron.training import compile as compile_mod

    modes: list[object] = []

    class Layer(nn.Module):
        def compile(self, *args, **kwargs):  # records instead of compiling
            modes.append(kwargs.get("mode"))

    layers = [Layer(), Layer()]
    monkeypatch.setattr(compile_mod, "transformer_layers", lambda model: layers)
    for mode, expected in (("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                           ("default", None)):
        modes.clear()
        cfg = make_config(torch_compile=True, torch_compile_mode=mode)
        done = compile_mod.apply_compile_and_fp8(nn.Identity(), cfg)
        assert done["compiled_layers"] == 2 and modes == [expected, expected]
