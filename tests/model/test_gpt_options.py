"""Every architecture option builds and trains one step in fp32 and bf16 with finite values."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron.model import lm_loss
from megatron.parallel import ParallelState, model_parallel_seed
from tests.model.gpt_model_helpers import batch, build, document_mask, make_config

OPTIONS: dict[str, dict[str, Any]] = {
    "learned": {"pos_emb": "learned"},
    "learned-opt-offset": {"pos_emb": "learned", "opt_pos_emb_offset": 2},
    "sinusoidal": {"pos_emb": "sinusoidal"},
    "rotary": {"pos_emb": "rotary"},
    "rotary-partial-base": {"pos_emb": "rotary", "rotary_pct": 0.25, "rotary_emb_base": 500},
    "rotary-saved-freqs": {"pos_emb": "rotary", "rotary_save_freqs_buffer": True},
    "alibi": {"pos_emb": "alibi"},
    "alibi-6-heads": {"pos_emb": "alibi", "hidden_size": 48, "num_attention_heads": 6},
    "rpe": {"pos_emb": "rpe", "rpe_num_buckets": 8, "rpe_max_distance": 16},
    "no-positions": {"pos_emb": "none"},
    "rmsnorm": {"norm": "rmsnorm"},
    "scalenorm": {"norm": "scalenorm"},
    "layernorm-no-bias": {"use_bias_in_norms": False},
    **{f"act-{a}": {"activation": a} for a in (
        "gelu", "relu", "silu", "swish", "mish", "softsign",
        "geglu", "swiglu", "reglu", "bilinear", "glu",
    )},
    "openai-gelu": {"openai_gelu": True},
    "legacy-geglu-switch": {"geglu": True},
    "legacy-llama-mlp": {"mlp_type": "llama", "mlp_multiple_of": 16},
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1},
    "untied": {"no_weight_tying": True},
    "no-biases": {"use_bias_in_attn_linear": False, "use_bias_in_mlp": False},
    "qk-layernorm": {"use_qk_layernorm": True},
    "qk-rmsnorm": {"use_qk_layernorm": True, "norm": "rmsnorm"},
    "post-ln-residual": {"apply_residual_connection_post_layernorm": True},
    "gpt-j-residual": {"gpt_j_residual": True},
    "gpt-j-tied": {"gpt_j_residual": True, "gpt_j_tied": True},
    "local-attention": {"attention_config": [[["local", "global"], 2]], "sliding_window_width": 4},
    "flash-alibi": {"attention_config": [[["flash"], "all"]], "pos_emb": "alibi"},
    "qk-layer-scaling": {"apply_query_key_layer_scaling": True},
    "fp32-softmax": {"attention_softmax_in_fp32": True},
    "dropout": {"attention_dropout": 0.2, "hidden_dropout": 0.2},
    "checkpointing": {"checkpoint_activations": True, "hidden_dropout": 0.1},
    "shared-grouped": {"num_layers": 4, "num_unique_layers": 2},
    "shared-spaced": {"num_layers": 4, "num_unique_layers": 2, "param_sharing_style": "spaced"},
    "fusions": {
        "scaled_upper_triang_masked_softmax_fusion": True, "scaled_masked_softmax_fusion": True,
        "bias_gelu_fusion": True, "bias_dropout_fusion": True, "rope_fusion": True,
        "layernorm_fusion": True, "pos_emb": "rotary",
    },
    "rmsnorm-fusion": {"norm": "rmsnorm", "rmsnorm_fusion": True},
    "fp16-cross-entropy": {"fp16_lm_cross_entropy": True},
    **{f"init-{m}": {"init_method": m, "output_layer_init_method": m} for m in (
        "normal", "scaled_normal", "orthogonal", "scaled_orthogonal", "xavier_uniform",
        "xavier_normal", "wang_init", "small_init", "single_residual_scaled_normal",
    )},
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_one_step_with_finite_values(name: str, dtype: torch.dtype) -> None:
    cfg = make_config(**OPTIONS[name])
    tracker = model_parallel_seed(1234, ParallelState.single())
    model = build(cfg, tracker=tracker).to(dtype).train()
    tokens, labels, loss_mask = batch(2, 16)
    mask, positions = document_mask(tokens, [7])
    logits = model(tokens, positions, mask)
    assert logits.dtype == dtype and logits.shape == (2, 16, cfg.tokenizer.padded_vocab_size)
    loss = lm_loss(logits, labels, loss_mask, ParallelState.single(),
                   fp32=not cfg.model.fp16_lm_cross_entropy)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert 2.0 < loss.item() < 8.0  # about log(vocab) for a freshly initialized model
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
