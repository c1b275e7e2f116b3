"""Model structure: state-dict names, residual forms, parameter sharing, activation
checkpointing, initialization, parameter counts, the loss, and the tiny NeoX/Llama configs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.model import gather_logits, lm_loss
from megatron.model.attention import AttentionInputs
from megatron.model.layout import Activations
from megatron.model_size import parameter_count
from megatron.parallel import ParallelState, model_parallel_seed
from tests.model.gpt_model_helpers import batch, build, grads, load_tiny, make_config

SINGLE = ParallelState.single()


def _layer_names(i: int, *, bias: bool, gated_norm: bool = True) -> set[str]:
    names = {
        f"layers.{i}.input_layernorm.weight",
        f"layers.{i}.attention.query_key_value.weight",
        f"layers.{i}.attention.dense.weight",
        f"layers.{i}.mlp.dense_h_to_4h.weight",
        f"layers.{i}.mlp.dense_4h_to_h.weight",
    }
    if gated_norm:
        names.add(f"layers.{i}.post_attention_layernorm.weight")
    if bias:
        names |= {n.replace(".weight", ".bias") for n in names}
    return names


def test_state_dict_names_are_the_documented_ones() -> None:
    tied = build(make_config(pos_emb="learned"))
    expected = {"embed.word_embeddings.weight", "embed.position_embeddings.weight",
                "final_norm.weight", "final_norm.bias"}
    expected |= _layer_names(0, bias=True) | _layer_names(1, bias=True)
    assert set(tied.state_dict()) == expected

    llama = build(make_config(
        pos_emb="rpe", norm="rmsnorm", no_weight_tying=True, use_bias_in_attn_linear=False,
        use_bias_in_mlp=False, use_qk_layernorm=True, gpt_j_residual=True, gpt_j_tied=True,
    ))  # fmt: skip
    expected = {"embed.word_embeddings.weight", "rpe.relative_attention_bias.weight",
                "final_norm.weight", "output_layer.weight"}
    for i in range(2):
        expected |= _layer_names(i, bias=False, gated_norm=False)
        expected |= {f"layers.{i}.attention.q_norm.weight", f"layers.{i}.attention.k_norm.weight"}
    assert set(llama.state_dict()) == expected


def _run_layer(layer: Any, x: torch.Tensor) -> torch.Tensor:
    inputs = AttentionInputs(torch.arange(x.shape[0]).expand(x.shape[1], -1))
    return layer(Activations(x, inputs), layer_number=1).x


@pytest.mark.parametrize("form", ["pre-norm", "post-ln-residual", "gpt-j", "gpt-j-tied"])
def test_residual_forms_follow_their_formulas(form: str) -> None:
    overrides = {
        "pre-norm": {},
        "post-ln-residual": {"apply_residual_connection_post_layernorm": True},
        "gpt-j": {"gpt_j_residual": True},
        "gpt-j-tied": {"gpt_j_residual": True, "gpt_j_tied": True},
    }[form]
    layer = build(make_config(pos_emb="rotary", **overrides)).layers[0]
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm is not None:  # non-trivial norm parameters tell the two norms apart
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(0))
    inputs = AttentionInputs(torch.arange(16).expand(2, 16))

    def attn(h: torch.Tensor) -> torch.Tensor:
        return layer.attention(h, inputs, layer_number=1)[0]

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return layer.mlp(h)[0]

    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    with torch.no_grad():
        if form == "pre-norm":
            h = x + attn(ln1(x))
            expected = h + mlp(ln2(h))
        elif form == "post-ln-residual":
            a = ln1(x)
            h = a + attn(a)
            m = ln2(h)
            expected = m + mlp(m)
        elif form == "gpt-j":
            expected = x + attn(ln1(x)) + mlp(ln2(x))
        else:
            assert ln2 is None
            expected = x + attn(ln1(x)) + mlp(ln1(x))
        assert_close(_run_layer(layer, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style, plan", [("grouped", [0, 0, 1, 1]), ("spaced", [0, 1, 0, 1])])
def test_parameter_sharing_shares_parameters_and_sums_their_gradients(style: str,
                                                                      plan: list[int]) -> None:
    shared_cfg = make_config(num_layers=4, num_unique_layers=2, param_sharing_style=style)
    shared = build(shared_cfg)
    assert shared.plan == plan
    plain = build(make_config(num_layers=4))
    per_layer = sum(p.numel() for p in plain.layers[0].parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_shared == sum(p.numel() for p in plain.parameters()) - 2 * per_layer
    # the unshared model with copies of the shared layers computes the same thing
    state = plain.state_dict()
    for depth, unique in enumerate(plan):
        for name, value in shared.layers[unique].state_dict().items():
            state[f"layers.{depth}.{name}"] = value
    for name in ("embed.word_embeddings.weight", "final_norm.weight", "final_norm.bias"):
        state[name] = shared.state_dict()[name]
    plain.load_state_dict(state)
    tokens, labels, loss_mask = batch(2, 16)
    for model in (shared, plain):
        lm_loss(model(tokens), labels, loss_mask, SINGLE).backward()
    assert_close(shared(tokens), plain(tokens), rtol=1e-5, atol=1e-6)
    shared_grads, plain_grads = grads(shared), grads(plain)
    for unique in range(2):
        depths = [d for d, u in enumerate(plan) if u == unique]
        for name, param in shared.layers[unique].named_parameters():
            expected = sum(plain_grads[f"layers.{d}.{name}"] for d in depths)
            assert_close(shared_grads[f"layers.{unique}.{name}"], expected, rtol=1e-4, atol=1e-6)
            assert param.grad.abs().sum() > 0


@pytest.mark.parametrize("chunk", [1, 3])
def test_activation_checkpointing_reproduces_loss_and_gradients_with_dropout(chunk: int) -> None:
    common = {"num_layers": 4, "attention_dropout": 0.3, "hidden_dropout": 0.3,
              "pos_emb": "rotary", "checkpoint_num_layers": chunk}
    tokens, labels, loss_mask = batch(2, 16)
    results = []
    for ckpt in (False, True):
        cfg = make_config(checkpoint_activations=ckpt, **common)
        tracker = model_parallel_seed(77, SINGLE)
        # same weights and, after the same initialization, the same default RNG state
        model = build(cfg, seed=4, tracker=tracker)
        assert model.checkpoint_num_layers == (chunk if ckpt else 0)
        loss = lm_loss(model(tokens), labels, loss_mask, SINGLE)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    with torch.no_grad():
        clean = lm_loss(model.eval()(tokens), labels, loss_mask, SINGLE)
    assert not torch.allclose(results[0][0], clean)  # dropout was active
    assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, g in results[0][1].items():
        assert_close(results[1][1][name], g, rtol=1e-6, atol=1e-7, msg=name)


COUNT_CASES: dict[str, dict[str, Any]] = {
    "mha-learned-tied": {"pos_emb": "learned", "opt_pos_emb_offset": 2},
    "gqa-rotary-untied-swiglu": {"pos_emb": "rotary", "num_kv_heads": 2, "activation": "swiglu",
                                 "no_weight_tying": True, "mlp_multiple_of": 16},
    "no-biases-rmsnorm": {"use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
                          "norm": "rmsnorm", "use_bias_in_norms": False},
    "rpe-geglu": {"pos_emb": "rpe", "activation": "geglu", "intermediate_size": 40},
    "alibi-scalenorm-gptj-tied": {"pos_emb": "alibi", "norm": "scalenorm",
                                  "gpt_j_residual": True, "gpt_j_tied": True},
    "qk-norms": {"use_qk_layernorm": True, "num_kv_heads": 1},
    "qk-rmsnorms": {"use_qk_layernorm": True, "norm": "rmsnorm"},
    "layernorm-no-bias-qk": {"use_qk_layernorm": True, "use_bias_in_norms": False},
    "shared": {"num_layers": 6, "num_unique_layers": 3, "param_sharing_style": "spaced"},
    "sinusoidal": {"pos_emb": "sinusoidal", "hidden_size": 48, "num_attention_heads": 6},
}  # fmt: skip


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_parameter_count_equals_the_built_model(case: str) -> None:
    cfg = make_config(**COUNT_CASES[case])
    model = build(cfg)
    built = sum(p.numel() for p in model.parameters())  # shared parameters once
    assert parameter_count(cfg.model, cfg.tokenizer.padded_vocab_size) == built


def test_tiny_llama_parameter_count_by_hand() -> None:
    cfg = load_tiny("tiny_llama")
    v, h, ffn, kv_dim = cfg.tokenizer.padded_vocab_size, 64, 176, 2 * 16
    layer = h * h + 2 * h * kv_dim + h * h + 3 * h * ffn + 2 * h
    assert parameter_count(cfg.model, v) == 2 * v * h + 2 * layer + h


@pytest.mark.parametrize("name, std", [
    ("normal", 0.02), ("scaled_normal", 0.02 / math.sqrt(8)),
    ("single_residual_scaled_normal", 0.01), ("small_init", math.sqrt(2 / 320)),
    ("wang_init", 2 / (4 * 8)),
])  # fmt: skip
def test_normal_init_methods_have_their_standard_deviation(name: str, std: float) -> None:
    cfg = make_config(num_layers=4, hidden_size=64, init_method=name,
                      output_layer_init_method="normal", init_method_std=0.02)
    model = build(cfg)
    weight = model.layers[0].attention.query_key_value.weight  # 192 x 64
    assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].attention.dense.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.layers[0].attention.query_key_value.bias) == 0


def test_output_layer_init_applies_to_attention_dense_and_mlp_down_projection() -> None:
    cfg = make_config(num_layers=4, hidden_size=64, init_method="normal",
                      output_layer_init_method="scaled_normal")
    layer = build(cfg).layers[1]
    scaled = 0.02 / math.sqrt(8)
    assert layer.attention.dense.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.dense_h_to_4h.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("name, gain2", [("orthogonal", 2.0), ("scaled_orthogonal", 0.5)])
def test_orthogonal_init_methods(name: str, gain2: float) -> None:
    model = build(make_config(num_layers=4, hidden_size=64, init_method=name))
    w = model.layers[0].attention.query_key_value.weight  # 192 x 64: orthonormal columns
    assert_close(w.T @ w, gain2 * torch.eye(64), rtol=0, atol=1e-4)


def test_xavier_init_and_seeded_reproducibility() -> None:
    cfg = make_config(hidden_size=64, init_method="xavier_uniform")
    w = build(cfg).layers[0].attention.query_key_value.weight
    bound = math.sqrt(6 / (64 + 192))
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    normal = make_config(hidden_size=64, init_method="xavier_normal")
    w = build(normal).layers[0].attention.query_key_value.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    a, b, c = build(cfg, seed=1), build(cfg, seed=1), build(cfg, seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "query_key_value.weight" in name:
            assert not torch.equal(pa, pc)


def test_lm_loss_is_the_masked_mean_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    loss_mask = torch.tensor([[1.0, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    per_token = F.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="none")
    expected = (per_token * loss_mask.view(-1)).sum() / loss_mask.sum()
    assert_close(lm_loss(logits, labels, loss_mask, SINGLE), expected)
    half = lm_loss(logits.bfloat16(), labels, loss_mask, SINGLE, fp32=False)
    assert half.dtype == torch.float32
    assert_close(half, expected, rtol=2e-2, atol=0)
    assert lm_loss(logits, labels, torch.zeros(2, 5), SINGLE).item() == 0.0
    assert torch.equal(gather_logits(logits, SINGLE), logits)


def test_tiny_neox_config_builds_a_gpt_neox_shaped_model() -> None:
    cfg = load_tiny("tiny_neox")
    model = build(cfg)
    layer = model.layers[0]
    assert layer.parallel_residual and layer.post_attention_layernorm is not None
    assert layer.attention.rotary_emb is not None and layer.attention.rotary_emb.dim == 4
    assert layer.attention.query_key_value.bias is not None
    assert layer.input_layernorm.bias is not None and layer.mlp.ffn == 256
    assert model.output_layer is not None  # untied embed_out
    tokens, labels, loss_mask = batch(2, 64)
    loss = lm_loss(model(tokens), labels, loss_mask, SINGLE)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_tiny_llama_config_builds_a_llama_shaped_model() -> None:
    cfg = load_tiny("tiny_llama")
    model = build(cfg)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    layer = model.layers[0]
    assert type(layer.input_layernorm).__name__ == "RMSNorm"
    assert layer.attention.local_kv_heads == 2 and layer.attention.n_rep == 2
    assert layer.attention.query_key_value.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert layer.mlp.gated and layer.mlp.dense_h_to_4h.weight.shape == (2 * 176, 64)
    assert layer.attention.rotary_emb.dim == 16 and not layer.parallel_residual
    assert model.output_layer is not None
    tokens, labels, loss_mask = batch(2, 64)
    loss = lm_loss(model(tokens), labels, loss_mask, SINGLE)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
