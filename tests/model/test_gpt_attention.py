"""Attention: the QKV layout against an independent reference, GQA, causality of every path,
fused versus unfused paths, dropout streams and KV-cache decoding."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from megatron.model import GPTModel, lm_loss
from megatron.model.attention import AttentionInputs
from megatron.parallel import ParallelState, model_parallel_seed
from tests.model.gpt_model_helpers import batch, build, document_mask, grads, make_config

CLOSE = {"rtol": 1e-5, "atol": 1e-5}


def _reference_rotary(x: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """x [b, heads, s, d]: positions 0..s-1, pairs (i, i + rot_dim/2)."""
    s = x.shape[2]
    half = rot_dim // 2
    theta = torch.arange(s, dtype=torch.float64)[:, None] * base ** (
        -2.0 * torch.arange(half, dtype=torch.float64) / rot_dim
    )
    c, sn = theta.cos(), theta.sin()
    x = x.double()
    a, b = x[..., :half], x[..., half:rot_dim]
    return torch.cat([a * c - b * sn, a * sn + b * c, x[..., rot_dim:]], dim=-1)


def test_multi_head_attention_matches_a_reference_with_the_gpt_neox_qkv_layout() -> None:
    cfg = make_config(pos_emb="rotary", rotary_pct=0.5, num_kv_heads=4)
    attn = build(cfg).layers[0].attention
    heads, hd, s, b = 4, 8, 10, 2
    x = torch.randn(s, b, 32, generator=torch.Generator().manual_seed(3))
    out, _ = attn(x, AttentionInputs(torch.arange(s).expand(b, s)), layer_number=1)

    w, bias = attn.query_key_value.weight.double(), attn.query_key_value.bias.double()
    qkv = (x.double() @ w.T + bias).view(s, b, heads, 3 * hd).permute(1, 2, 0, 3)
    q, k, v = qkv[..., :hd], qkv[..., hd : 2 * hd], qkv[..., 2 * hd :]
    q, k = _reference_rotary(q, 4, 10000.0), _reference_rotary(k, 4, 10000.0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    context = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(s, b, heads * hd)
    expected = context @ attn.dense.weight.double().T + attn.dense.bias.double()
    assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads() -> None:
    gqa_cfg = make_config(pos_emb="rotary", num_kv_heads=2)
    mha_cfg = make_config(pos_emb="rotary")
    gqa, mha = build(gqa_cfg), build(mha_cfg, seed=99)
    hd, n_rep = 8, 2
    state = mha.state_dict()
    for name, value in gqa.state_dict().items():
        if "query_key_value" not in name:
            state[name] = value
            continue
        # GQA rows: for each group g, [q(2 heads), k_g, v_g]; MHA rows: for each head [q, k, v]
        groups = value.view(2, n_rep + 2, hd, *value.shape[1:])
        rows = []
        for head in range(4):
            g, r = divmod(head, n_rep)
            rows += [groups[g, r], groups[g, n_rep], groups[g, n_rep + 1]]
        state[name] = torch.cat(rows, dim=0)
    mha.load_state_dict(state)
    tokens, _, _ = batch(2, 16)
    assert_close(mha(tokens), gqa(tokens), **CLOSE)


PATHS: dict[str, dict[str, Any]] = {
    "sdpa": {},
    "explicit-fp32-softmax": {"attention_softmax_in_fp32": True},
    "qk-layer-scaling": {"apply_query_key_layer_scaling": True},
    "local": {"attention_config": [[["local"], 2]], "sliding_window_width": 4},
    "flash": {"attention_config": [[["flash"], 2]]},
    "fused-masked-softmax": {"scaled_masked_softmax_fusion": True},
    "document-mask": {},
}


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rotary", "alibi", "rpe", "none"])
@pytest.mark.parametrize("path", list(PATHS))
def test_changing_a_token_never_changes_earlier_logits(pos_emb: str, path: str) -> None:
    cfg = make_config(pos_emb=pos_emb, rpe_num_buckets=8, rpe_max_distance=16, **PATHS[path])
    model = build(cfg).eval()
    tokens, _, _ = batch(2, 16)
    changed_at = 9
    other = tokens.clone()
    other[:, changed_at] = (other[:, changed_at] + 1) % 100
    mask, positions = (document_mask(tokens, [5, 12]) if path == "document-mask" else (None, None))
    with torch.no_grad():
        a, b = model(tokens, positions, mask), model(other, positions, mask)
    assert torch.equal(a[:, :changed_at], b[:, :changed_at])
    assert not torch.allclose(a[:, changed_at], b[:, changed_at])
    if path == "local":
        # two window-4 layers: position 9 reaches at most position 9 + 2 * 3 = 15 ... so
        # change an earlier token and check the positions beyond its reach
        early = tokens.clone()
        early[:, 2] = (early[:, 2] + 1) % 100
        with torch.no_grad():
            c = model(early)
        assert torch.equal(a[:, 9:], c[:, 9:]) and not torch.allclose(a[:, 2:9], c[:, 2:9])
    if path == "document-mask":
        # the documents at [5, 12) and [12, 16) never see the first one
        early = tokens.clone()
        early[:, 2] = (early[:, 2] + 1) % 100
        with torch.no_grad():
            c = model(early, positions, mask)
        assert torch.equal(a[:, 5:], c[:, 5:]) and not torch.allclose(a[:, 2:5], c[:, 2:5])


def test_plain_causal_mask_runs_as_causal_and_other_masks_are_applied() -> None:
    model = build(make_config(pos_emb="rotary")).eval()
    tokens, _, _ = batch(1, 16)
    causal = torch.ones(16, 16, dtype=torch.bool).triu(1).view(1, 1, 16, 16)
    docs, positions = document_mask(tokens, [8])
    with torch.no_grad():
        plain = model(tokens)
        assert torch.equal(model(tokens, None, causal), plain)
        split = model(tokens, positions, docs)
    assert_close(split[:, :8], plain[:, :8], **CLOSE)  # explicit path versus SDPA
    assert not torch.allclose(split[:, 8:], plain[:, 8:])


FUSIONS: dict[str, dict[str, Any]] = {
    "upper-triang-softmax": {"scaled_upper_triang_masked_softmax_fusion": True},
    "masked-softmax-alibi-local": {"scaled_masked_softmax_fusion": True},
    "bias-gelu": {"bias_gelu_fusion": True},
    "bias-dropout": {"bias_dropout_fusion": True},
    "rope": {"rope_fusion": True},
    "layernorm": {"layernorm_fusion": True},
    "rmsnorm": {"rmsnorm_fusion": True},
}
FUSION_BASE: dict[str, dict[str, Any]] = {
    "masked-softmax-alibi-local": {
        "pos_emb": "alibi", "attention_config": [[["local", "global"], 2]],
        "sliding_window_width": 5,
    },
    "rmsnorm": {"norm": "rmsnorm"},
    "rope": {"pos_emb": "rotary"},
    # the fused bias-GeLU computes the tanh approximation (test_bias_gelu_fusion_is_tanh_gelu)
    "bias-gelu": {"openai_gelu": True},
}  # fmt: skip


@pytest.mark.parametrize("flag", list(FUSIONS))
def test_fusion_flags_give_the_same_numbers(flag: str) -> None:
    base = FUSION_BASE.get(flag, {})
    tokens, labels, loss_mask = batch(2, 16)
    mask, positions = document_mask(tokens, [6])
    results = []
    for overrides in ({}, FUSIONS[flag]):
        model = build(make_config(**base, **overrides))
        logits = model(tokens, positions, mask)
        lm_loss(logits, labels, loss_mask, ParallelState.single()).backward()
        results.append((logits.detach(), grads(model)))
    assert_close(results[1][0], results[0][0], **CLOSE)
    assert results[0][1].keys() == results[1][1].keys()
    for name, g in results[0][1].items():
        assert_close(results[1][1][name], g, **CLOSE, msg=name)


def test_bias_gelu_fusion_is_tanh_gelu() -> None:
    """As in GPT-NeoX, whose fused bias-GeLU kernel is the tanh approximation of GeLU."""
    tokens, _, _ = batch(2, 16)
    outs = {name: build(make_config(**flags)).eval()(tokens).detach() for name, flags in (
        ("exact", {}), ("tanh", {"openai_gelu": True}), ("fused", {"bias_gelu_fusion": True}))}
    assert_close(outs["fused"], outs["tanh"], **CLOSE)
    assert not torch.allclose(outs["fused"], outs["exact"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("pos_emb", ["rotary", "alibi"])
def test_sdpa_path_equals_explicit_softmax_path(pos_emb: str) -> None:
    """In fp32, ``attention_softmax_in_fp32`` only switches to the explicit path."""
    tokens, _, _ = batch(2, 16)
    paths = [{}, {"attention_softmax_in_fp32": True}, {"apply_query_key_layer_scaling": True}]
    if pos_emb == "alibi":
        paths.append({"scaled_masked_softmax_fusion": True})
    outs = [build(make_config(pos_emb=pos_emb, **p)).eval()(tokens).detach() for p in paths]
    for out in outs[1:]:
        assert_close(out, outs[0], **CLOSE)


@pytest.mark.parametrize(
    "path", [{}, {"attention_softmax_in_fp32": True}], ids=["sdpa", "explicit"]
)
def test_attention_dropout_draws_from_the_tracker_stream(path: dict) -> None:
    cfg = make_config(attention_dropout=0.5, **path)
    tracker = model_parallel_seed(5, ParallelState.single())
    model = build(cfg, tracker=tracker)
    tokens, _, _ = batch(2, 16)
    with torch.no_grad():
        reference = model.eval()(tokens)
        model.train()
        default_before = torch.get_rng_state()
        tracked_before = tracker.get_states()["model-parallel-rng"]
        dropped = model(tokens)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert not torch.equal(tracker.get_states()["model-parallel-rng"], tracked_before)
    assert not torch.allclose(dropped, reference)
    # replaying the tracker state reproduces the mask
    tracker.set_states({"model-parallel-rng": tracked_before})
    with torch.no_grad():
        assert torch.equal(model(tokens), dropped)


KV_CASES: dict[str, dict[str, Any]] = {
    "rotary-gqa": {"pos_emb": "rotary", "num_kv_heads": 2, "rotary_pct": 0.5},
    "learned-offset": {"pos_emb": "learned", "opt_pos_emb_offset": 2},
    "sinusoidal": {"pos_emb": "sinusoidal"},
    "alibi-explicit": {"pos_emb": "alibi", "attention_softmax_in_fp32": True},
    "rpe": {"pos_emb": "rpe", "rpe_num_buckets": 8, "rpe_max_distance": 16},
    "local": {"attention_config": [[["local", "flash"], 2]], "sliding_window_width": 3},
    "shared-qknorm": {"num_layers": 4, "num_unique_layers": 2, "use_qk_layernorm": True,
                      "pos_emb": "rotary"},
}  # fmt: skip


@pytest.mark.parametrize("case", list(KV_CASES))
def test_kv_cache_decoding_equals_full_recompute(case: str) -> None:
    model: GPTModel = build(make_config(**KV_CASES[case])).eval()
    tokens, _, _ = batch(2, 16)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(batch_size=2)
        pieces = [model(tokens[:, :6], kv_cache=cache)]  # prefill
        for t in range(6, 11):  # one token at a time
            pieces.append(model(tokens[:, t : t + 1], kv_cache=cache))
        pieces.append(model(tokens[:, 11:], kv_cache=cache))  # a chunk on top of the cache
    assert cache.length == 16
    assert_close(torch.cat(pieces, dim=1), full, **CLOSE)
    cache.reset()
    with torch.no_grad():
        assert_close(model(tokens[:, :3], kv_cache=cache), full[:, :3], **CLOSE)
    with pytest.raises(ValueError, match="do not fit"):
        model(tokens, kv_cache=model.new_kv_cache(2, max_length=8))
