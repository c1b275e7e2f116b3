"""The layer types without attention (mamba, rwkv, gmlp, amlp): the chunked scans against the
step-by-step recurrences, cached-state decoding against recomputing the sequence, Mamba under
tensor (and sequence) parallelism against one rank, the pipeline form, and the config checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from megatron.model import gather_logits, lm_loss
from megatron.model.blocks import block_step, run_blocks
from megatron.model.layout import pipeline_layout
from megatron.model.pipeline import (
    activations_from_pipeline,
    activations_to_pipeline,
    model_to_pipeline_state_dict,
    pipeline_layer_specs,
)
from megatron.model.ssm_scan import (
    selective_scan_chunked,
    selective_scan_ref,
    wkv6_chunked,
    wkv6_ref,
)
from megatron.neox_arguments import ConfigError, padded_vocab_size
from megatron.parallel import ParallelState, RankTopology, split_tensor
from megatron.text_generation import SamplingParams, TokenGenerator
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import VOCAB, batch, build, make_config

TIGHT = {"rtol": 1e-4, "atol": 2e-6}


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
LAYER_MIXES = {
    "mamba": [[["mamba"], 2]],
    "rwkv": [[["rwkv"], 2]],
    "gmlp": [[["gmlp"], 2]],
    "amlp": [[["amlp"], 2]],
    "mamba+global": [[["mamba", "global"], 2]],
    "rwkv+amlp": [[["rwkv", "amlp"], 2]],
}


def _cfg(mix: str, **overrides: Any) -> Any:
    settings = {"attention_config": LAYER_MIXES[mix], "pos_emb": "none", "seq_length": 32}
    return make_config(**{**settings, **overrides})


# ------------------------------------------------------------------------- scans
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_selective_scan_equals_the_recurrence(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, d, length, n = 2, 6, 37, 4

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x, dt, z, B, C = rnd(b, d, length), rnd(b, d, length), rnd(b, d, length), \
        rnd(b, n, length), rnd(b, n, length)
    A = -torch.rand(d, n, generator=g) * 4
    D, bias, h0 = rnd(d), rnd(d), rnd(b, d, n)
    ref, ref_h = selective_scan_ref(x, dt, A, B, C, D, z, bias, state=h0)
    out, out_h = selective_scan_chunked(x, dt, A, B, C, D, z, bias, state=h0, chunk=chunk)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(out_h, ref_h, rtol=1e-5, atol=1e-5)
    # split in two calls, the state carried over: the same outputs
    cut = 20
    first, h = selective_scan_chunked(x[..., :cut], dt[..., :cut], A, B[..., :cut],
                                      C[..., :cut], D, z[..., :cut], bias, state=h0, chunk=chunk)
    second, _ = selective_scan_chunked(x[..., cut:], dt[..., cut:], A, B[..., cut:],
                                       C[..., cut:], D, z[..., cut:], bias, state=h, chunk=chunk)
    assert_close(torch.cat([first, second], -1), ref, rtol=1e-5, atol=1e-5)
    # the state matters
    assert not torch.allclose(selective_scan_ref(x, dt, A, B, C, D, z, bias)[0], ref)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_wkv6_equals_the_recurrence(chunk: int) -> None:
    g = torch.Generator().manual_seed(1)
    b, heads, length, n = 2, 3, 29, 8
    r, k, v = (torch.randn(b, heads, length, n, generator=g) for _ in range(3))
    w = torch.randn(b, heads, length, n, generator=g) - 1  # strong and weak decays
    u = torch.randn(heads, n, generator=g)
    s0 = torch.randn(b, heads, n, n, generator=g)
    ref, ref_s = wkv6_ref(r, k, v, w, u, state=s0)
    out, out_s = wkv6_chunked(r, k, v, w, u, state=s0, chunk=chunk)
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(out_s, ref_s, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wkv6_ref(r, k, v, w, u)[0], ref)


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("mix", list(LAYER_MIXES))
def test_cached_decoding_equals_recomputing_the_sequence(mix: str) -> None:
    model = build(_cfg(mix), seed=3).eval()
    tokens, labels, loss_mask = batch(2, 32, seed=4)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2, max_length=32)
        parts = [model(tokens[:, :11], kv_cache=cache)]
        for i in range(11, 32, 3):  # several tokens per step, then one
            parts.append(model(tokens[:, i:i + 3], kv_cache=cache))
        assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        cache.reset()  # a new sequence starts from an empty state
        assert_close(model(tokens[:, :5], kv_cache=cache), full[:, :5], rtol=1e-5, atol=1e-5)
    # the layers learn: a few SGD steps lower the loss on a fixed batch
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        loss = lm_loss(model(tokens), labels, loss_mask, ParallelState.single())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_generation_with_the_cache_equals_recompute() -> None:
    model = build(_cfg("mamba+global"), seed=5).eval()
    prompt = [3, 14, 15, 9, 26]
    params = SamplingParams(temperature=0.0)
    outs = [TokenGenerator(model, ParallelState.single(), eod=0, recompute=recompute,
                           max_length=32).generate(prompt, params, max_new_tokens=12)
            for recompute in (False, True)]
    assert outs[0].tokens == outs[1].tokens and len(outs[0].tokens) > 0
    assert_close(torch.tensor(outs[0].logits), torch.tensor(outs[1].logits), rtol=1e-4,
                 atol=1e-4)


def test_fusion_keys_without_the_kernels_run_the_pure_path(capfd: Any) -> None:
    plain = build(_cfg("mamba"), seed=1).eval()
    fused = build(_cfg("mamba", mamba_selective_scan_fusion=True, mamba_causal_conv_fusion=True,
                       mamba_inner_func_fusion=True), seed=1).eval()
    tokens, _, _ = batch(2, 32)
    assert torch.equal(fused(tokens), plain(tokens))
    # one notice line per process at most (it may have been printed by an earlier test)
    assert capfd.readouterr().err.count("[mamba]") <= 1


def test_pipeline_blocks_compute_the_plain_model() -> None:
    cfg = _cfg("mamba+global", num_layers=4, attention_config=[[["mamba", "global", "rwkv",
                                                                 "gmlp"], 4]])
    model = build(cfg, seed=2).eval()
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    pipe_sd = model_to_pipeline_state_dict(model.state_dict(), cfg.model)
    steps = []
    for index, (entry, spec) in enumerate(zip(pipeline_layout(cfg.model), specs)):
        key = getattr(spec, "key", None)
        module = spec.build().eval()
        prefix = f"tied_modules.{key}." if key else f"{index}."
        module.load_state_dict({k[len(prefix):]: v for k, v in pipe_sd.items()
                                if k.startswith(prefix)})
        steps.append((entry, block_step(entry, module)))
    tokens, _, _ = batch(2, 32)
    positions = torch.arange(32).expand(2, 32)
    half = 3  # embed and two layers on the first stage
    first = (tokens, positions, torch.zeros(0, dtype=torch.bool))
    act = run_blocks(steps[:half], activations_from_pipeline(first, first=True))
    x = run_blocks(steps[half:], activations_from_pipeline(activations_to_pipeline(act),
                                                           first=False)).x
    assert_close(x, model(tokens), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ tensor parallel
def _mamba_tp2_vs_tp1(rank: int, world: int) -> list[str]:
    base = ParallelState.initialize(RankTopology(2, 2, 1))
    cfg = _cfg("mamba+global", norm="rmsnorm", mamba_use_bias_in_linears=True)
    vocab = padded_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, 2)
    tokens, labels, loss_mask = batch(2, 32, seed=7)
    dense = build(cfg, seed=11, padded_vocab=vocab)
    dense_logits = dense(tokens)
    lm_loss(dense_logits, labels, loss_mask, ParallelState.single()).backward()
    dense_params = dict(dense.named_parameters())
    checked = []
    for sp in (False, True):
        state = base.with_sequence_parallel(sp)
        par = build(cfg, seed=11, state=state, padded_vocab=vocab)
        logits = par(tokens)
        lm_loss(logits, labels, loss_mask, state).backward()
        assert_close(gather_logits(logits, state), dense_logits, **TIGHT)
        for name, p in par.named_parameters():
            full = dense_params[name]
            shard = (split_tensor(full, p.partition_dim, 2, rank, p.partition_stride)
                     if p.tensor_model_parallel else full)
            grad = (split_tensor(full.grad, p.partition_dim, 2, rank, p.partition_stride)
                    if p.tensor_model_parallel else full.grad)
            assert torch.equal(p, shard), name
            assert_close(p.grad, grad, **TIGHT, msg=f"sp={sp} {name}")
            checked.append(name)
    return checked


@pytest.mark.distributed
def test_mamba_tensor_parallel_matches_one_rank() -> None:
    results = run_distributed(_mamba_tp2_vs_tp1, 2, timeout=240)
    assert any("mixer.A_log" in name for name in results[0])


# ------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    ({"attention_config": [[["rwkv"], 2]], "model_parallel_size": 2},
     "rwkv layers do not support tensor parallelism"),
    ({"attention_config": [[["gmlp", "amlp"], 2]], "model_parallel_size": 2},
     "amlp, gmlp layers do not support tensor parallelism"),
    ({"attention_config": [[["mamba"], 2]], "mamba_inner_func_fusion": True,
      "mamba_use_bias_in_linears": True}, "has no biases in its projections"),
    ({"attention_config": [[["rwkv"], 2]], "hidden_size": 48, "num_attention_heads": 4},
     "hidden_size: RWKV layers need a multiple of 32, got 48"),
    ({"attention_config": [[["rwkv"], 2]], "head_size": 4}, "head_size 4 x num_attention_heads"),
    ({"attention_config": [[["mamba"], 2]], "bf16": {"enabled": True}},
     "mamba_selective_fp32_params: A_log and D cannot stay fp32 parameters in bfloat16"),
])  # fmt: skip
def test_config_refusals(overrides: dict[str, Any], message: str) -> None:
    world = overrides.get("model_parallel_size", 1)
    with pytest.raises(ConfigError, match=message):
        make_config(world_size=world, **overrides)


def test_mamba_in_bf16_trains_with_selective_fp32_params_off() -> None:
    cfg = make_config(attention_config=[[["mamba"], 2]], bf16={"enabled": True},
                      mamba_selective_fp32_params=False)
    assert cfg.model.mamba_selective_fp32_params is False


def test_default_type_partition_balances_layers_without_attention() -> None:
    from megatron.model.pipeline import partition_pipeline_layers

    cfg = _cfg("mamba", num_layers=4, attention_config=[[["mamba", "rwkv"], 4]])
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    parts = partition_pipeline_layers(specs, cfg.parallelism.pipe_partition_method, 2)
    kinds = [spec.typename.__name__ for spec in specs]
    first, second = kinds[parts[0]:parts[1]], kinds[parts[1]:parts[2]]
    assert first.count("MambaLayer") + first.count("RWKVLayer") == 2, (parts, kinds)
    assert second.count("MambaLayer") + second.count("RWKVLayer") == 2, (parts, kinds)


@pytest.mark.parametrize("mix, overrides", [
    ("mamba", {"norm": "rmsnorm", "mamba_use_bias_in_linears": True, "expansion_factor": 3}),
    ("mamba+global", {"mamba_use_bias_in_conv": False}),
    ("rwkv", {"dim_att": 64, "ffn_dim": 96}),
    ("rwkv+amlp", {"num_layers": 4, "num_unique_layers": 2, "param_sharing_style": "spaced",
                   "attention_config": [[["rwkv", "amlp"], 4]]}),
    ("gmlp", {"expansion_factor": 2}),
])  # fmt: skip
def test_parameter_count_and_flops_follow_the_layer_types(mix: str, overrides: dict) -> None:
    from megatron.model_size import flops_per_token, parameter_count

    cfg = _cfg(mix, **overrides)
    vocab = cfg.tokenizer.padded_vocab_size
    with torch.device("meta"):
        model = build(cfg)
    assert parameter_count(cfg.model, vocab) == sum(p.numel() for p in model.parameters())
    attention = _cfg(mix, **{**overrides, "attention_config": None})
    assert flops_per_token(cfg.model, vocab) != flops_per_token(attention.model, vocab)
    assert flops_per_token(cfg.model, vocab, recompute=True) > flops_per_token(cfg.model, vocab)
