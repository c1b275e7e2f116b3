"""The mixture-of-experts block in one process: routing rules, the block against an explicit
per-token sum over experts, token dropping, the auxiliary losses' gradients, parameter and
FLOP counts, the grouped matmul paths, and GPT-NeoX's MoE example config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megatron.model.args import ModelArgs, is_moe_layer
from megatron.model.init_methods import model_init_methods
from megatron.model.moe import MoEMLP, _AttachAuxLoss, grouped_mm
from megatron.model.router import Router, sinkhorn
from megatron.model_size import active_parameter_count, flops_per_token, parameter_count
from megatron.neox_arguments import ConfigError, RunFacts, merge_configs, resolve_config
from megatron.neox_arguments.loader import read_config_file
from megatron.parallel import ParallelState
from tests.model.gpt_model_helpers import build, make_config

FIXTURE = Path(__file__).resolve().parents[1] / "config" / "fixtures" / "neox_125M-dmoe.yml"


def _args(**kw) -> ModelArgs:
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                max_position_embeddings=8, moe_num_experts=4, moe_top_k=2,
                moe_router_type="topk", intermediate_size=24)
    base.update(kw)
    return ModelArgs(**base)


def _block(**kw) -> MoEMLP:
    model = _args(**kw)
    init, out_init = model_init_methods(model)
    torch.manual_seed(0)
    return MoEMLP(model, state=ParallelState.single(), sequence_parallel=False,
                  init_method=init, output_init_method=out_init)


def _reference(block: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Every token through its chosen experts, one at a time."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = block.router(tokens)
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(block.top_k):
            e = int(routing.experts[t, j])
            h = block.w_in[e] @ tokens[t]
            if block.gated:
                gate, up = h.chunk(2)
                h = block.act(gate) * up
            else:
                h = block.act(h)
            out[t] += routing.weights[t, j] * (block.w_out[e] @ h)
    return out.reshape(x.shape)


def test_topk_weights_follow_mixtral_rule() -> None:
    router = Router(_args(moe_top_k=2), init_method=lambda w: torch.nn.init.normal_(w))
    x = torch.randn(10, 16)
    r = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    top, idx = probs.topk(2, dim=-1)
    assert torch.equal(r.experts, idx)
    assert_close(r.weights, top / top.sum(-1, keepdim=True))
    assert int(r.tokens_per_expert.sum()) == 20


def test_sinkhorn_balances_skewed_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 4) + torch.tensor([3.0, 0.0, 0.0, 0.0])
    balanced = sinkhorn(logits)
    plain = torch.bincount(logits.argmax(-1), minlength=4)
    even = torch.bincount(balanced.argmax(-1), minlength=4)
    assert int(plain.max()) > 40  # the skew sends most tokens to expert 0
    assert int(even.max()) - int(even.min()) < int(plain.max()) - int(plain.min())
    assert_close(balanced.sum(0), torch.full((4,), 1 / 4), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"activation": "swiglu"},
                                {"moe_router_type": "sinkhorn", "moe_top_k": 1}])
def test_block_matches_per_token_reference(kw: dict) -> None:
    block = _block(**kw)
    x = torch.randn(8, 2, 16)
    out, bias = block(x)
    assert bias is None
    assert_close(out, _reference(block, x), rtol=1e-5, atol=1e-6)


def test_token_dropping_respects_capacity() -> None:
    block = _block(moe_token_dropping=True, moe_train_capacity_factor=0.5, moe_min_capacity=1,
                   moe_top_k=1)
    x = torch.randn(8, 2, 16)
    out, _ = block(x)
    capacity = block.capacity(16)
    assert capacity == 2
    counts = block.router(x.reshape(-1, 16)).tokens_per_expert
    kept_rows = (out.reshape(-1, 16).abs().sum(-1) > 0).sum()
    assert int(kept_rows) == int(counts.clamp(max=capacity).sum())
    sums = block.stats.totals()
    assert sums is not None and int(sums[3]) == int((counts - capacity).clamp(min=0).sum())
    # dropless routes everything
    dense, _ = _block(moe_top_k=1)(x)
    assert int((dense.reshape(-1, 16).abs().sum(-1) > 0).sum()) == 16


def test_aux_losses_reach_router_gradient() -> None:
    coeffs = {"moe_aux_loss_coeff": 0.1, "moe_z_loss_coeff": 0.01}
    block = _block(**coeffs)
    block.aux_loss_scale = 0.5
    x = torch.randn(8, 2, 16)
    g = torch.randn(8, 2, 16)
    out, _ = block(x)
    (out * g).sum().backward()
    got = block.router.weight.grad.clone()
    # explicit objective: <out, g> + 0.5 * (aux + z)
    block.zero_grad()
    block.aux_loss_scale = 0.0  # the attached gradient is off; add the losses by hand
    out, _ = block(x)
    r = block.router(x.reshape(-1, 16))
    logits = x.reshape(-1, 16) @ block.router.weight.t()
    probs = torch.softmax(logits, -1)
    frac = r.tokens_per_expert.float() / (16 * 2)
    aux = 0.1 * 4 * (frac * probs.mean(0)).sum()
    z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    assert_close(r.aux_loss, aux.detach())
    ((out * g).sum() + 0.5 * (aux + z)).backward()
    assert_close(got, block.router.weight.grad, rtol=1e-5, atol=1e-7)
    assert not torch.equal(got, torch.zeros_like(got))


def test_attach_aux_loss_is_identity_forward() -> None:
    x = torch.randn(3, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    y = _AttachAuxLoss.apply(x, aux, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert float(aux.grad) == 0.25 and torch.equal(x.grad, torch.ones(3))


def test_grouped_mm_paths_agree() -> None:
    x = torch.randn(10, 6)
    w = torch.randn(3, 5, 6)
    counts = [4, 0, 6]
    loop = grouped_mm(x, w, counts)
    assert_close(loop[:4], x[:4] @ w[0].t())
    assert_close(loop[4:], x[4:] @ w[2].t())
    assert torch.equal(grouped_mm(x, w, counts, fused=True), loop)  # CPU: same path


def test_counts_use_every_expert_once_and_active_flops() -> None:
    cfg = make_config(moe_num_experts=4, moe_top_k=2, moe_expert_interval=2, num_layers=4,
                      moe_router_type="topk")
    model = build(cfg)
    vocab = cfg.tokenizer.padded_vocab_size
    built = sum(p.numel() for p in model.parameters())
    assert parameter_count(cfg.model, vocab) == built
    assert [is_moe_layer(cfg.model, d) for d in range(4)] == [True, False, True, False]
    dense = make_config(num_layers=4)
    ffn_params = 2 * 32 * 128
    assert active_parameter_count(cfg.model, vocab) == built - 2 * 2 * ffn_params
    extra = flops_per_token(cfg.model, vocab) - flops_per_token(dense.model, vocab)
    # per MoE layer: one more expert (top-2), the router, minus the dense MLP's biases' nothing
    assert extra == pytest.approx(3 * 2 * 2 * (ffn_params + 32 * 4))


def test_neox_moe_example_config_loads() -> None:
    merged = merge_configs([(str(FIXTURE), read_config_file(FIXTURE))])
    cfg = resolve_config(merged, RunFacts(world_size=1, launching=False, purpose=None))
    assert cfg.model.moe_num_experts == 4
    assert cfg.model.moe_router_type == "sinkhorn" and not cfg.model.moe_token_dropping
    assert cfg.parallelism.moe_expert_parallel_size == 1


def _config_error(**kw) -> str:
    from tests.config.cfg_helpers import make_cfg

    with pytest.raises(ConfigError) as info:
        make_cfg(**kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_moe_config_errors_name_the_key() -> None:
    assert _config_error(moe_num_experts=4, moe_top_k=5) == \
        "a.yml: moe_top_k: 5 must be between 1 and moe_num_experts 4"
    assert "expert_model_parallel_size" in _config_error(expert_model_parallel_size=2)
    assert "divisible" in _config_error(world_size=2, moe_num_experts=3,
                                        expert_model_parallel_size=2)
    assert "data-parallel size 1" in _config_error(moe_num_experts=4,
                                                   expert_model_parallel_size=2)
    assert make_cfg_ok(world_size=2, moe_num_experts=4, moe_expert_parallel_size=2)


def make_cfg_ok(**kw) -> bool:
    from tests.config.cfg_helpers import make_cfg

    return make_cfg(**kw).parallelism.moe_expert_parallel_size == 2


def test_moe_model_trains_with_checkpointing() -> None:
    cfg = make_config(moe_num_experts=4, moe_top_k=2, moe_router_type="topk",
                      checkpoint_activations=True, moe_aux_loss_coeff=0.01)
    model = build(cfg)
    model.train()
    tokens = torch.randint(0, 100, (2, 16))
    logits = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))
    loss.backward()
    block = model.layers[0].mlp
    assert isinstance(block, MoEMLP)
    assert block.w_in.grad is not None and block.router.weight.grad is not None
    sums = block.stats.totals()
    assert sums is not None and int(sums[0]) in (1, 2)  # a recompute adds the same pass
    assert int(sums[4:].sum()) == int(sums[0]) * 2 * 16 * 2  # tokens x top_k per pass


def test_moe_model_in_the_eval_adapter_and_kv_cache() -> None:
    from dataclasses import dataclass

    from megatron.evaluation.adapter import NeoXEvalAdapter
    from megatron.text_generation import TokenGenerator
    from megatron.tokenizer import build_tokenizer

    cfg = make_config(moe_num_experts=4, moe_top_k=2, moe_router_type="sinkhorn",
                      max_position_embeddings=64)
    model = build(cfg, seed=4, padded_vocab=512).eval()  # room for the character ids
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(batch_size=1)
        steps = [model(tokens[:, :5], kv_cache=cache)]
        steps += [model(tokens[:, i:i + 1], kv_cache=cache) for i in range(5, 12)]
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)

    @dataclass
    class Request:
        args: tuple

    tok = build_tokenizer("CharLevelTokenizer")
    gen = TokenGenerator(model, ParallelState.single(), eod=0, vocab_size=512)
    requests = [Request(("ab", "cd")), Request(("hello", " x"))]
    one = NeoXEvalAdapter(gen, tok, batch_size=1).loglikelihood(requests)
    both = NeoXEvalAdapter(gen, tok, batch_size=2).loglikelihood(requests)
    for (a, _), (b, _) in zip(one, both):
        assert a == pytest.approx(b, abs=1e-5) and a < 0


def test_router_keys_jitter_fp32_losses_eval_capacity_and_grouped_gemm() -> None:
    """moe_jitter_eps, moe_lbl_in_fp32, moe_eval_capacity_factor and moe_grouped_gemm as the
    block uses them."""
    x = torch.randn(8, 2, 16)
    tokens = x.reshape(-1, 16)
    # jitter: training logits come from the input times noise in [1 - eps, 1 + eps]; none in eval
    router = _block(moe_jitter_eps=0.9).router
    torch.manual_seed(1)
    jittered = router(tokens)
    torch.manual_seed(1)
    noise = torch.empty_like(tokens).uniform_(0.1, 1.9)
    plain = _block().router
    assert torch.equal(jittered.experts, plain(tokens * noise).experts)
    assert not torch.equal(jittered.experts, plain(tokens).experts)
    router.eval()
    assert torch.equal(router(tokens).experts, plain(tokens).experts)
    # auxiliary losses from bf16 logits: fp32 softmax with moe_lbl_in_fp32, bf16 without
    coeffs = {"moe_aux_loss_coeff": 1.0, "moe_z_loss_coeff": 1.0}
    low = _block(**coeffs).router.to(torch.bfloat16)
    high = _block(moe_lbl_in_fp32=True, **coeffs).router.to(torch.bfloat16)
    bf16 = tokens.to(torch.bfloat16)
    logits = torch.nn.functional.linear(bf16, high.weight).float()
    assert_close(high(bf16).z_loss, torch.logsumexp(logits, -1).square().mean())
    assert not torch.equal(low(bf16).z_loss, high(bf16).z_loss)
    # token dropping outside training uses the eval capacity factor
    block = _block(moe_token_dropping=True, moe_train_capacity_factor=4.0,
                   moe_eval_capacity_factor=0.25, moe_min_capacity=1, moe_top_k=1)
    assert block.capacity(16) == 16
    block.eval()
    assert block.capacity(16) == 1
    # the grouped-gemm switch computes the same block output
    fused = _block(moe_grouped_gemm=True)
    assert fused.fused and torch.equal(fused(x)[0], _block()(x)[0])
