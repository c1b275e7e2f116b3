"""flops_per_token against torch's FlopCounterMode on a reference model built from plain ops.

The reference follows the GPT shapes (fused QKV of width (heads + 2 * kv_heads) * head_dim,
attention through explicit matmuls over the full seq x seq square, MLP of width ffn, or two
halves for gated activations, tied vocabulary projection) and counts every matmul of a
forward + backward pass. Non-matmul work (softmax, norms, activations, the embedding lookup)
is invisible to FlopCounterMode and to flops_per_token alike, so the two must agree exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from megatron.model_size import ModelShape, flops_per_token
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config

VOCAB = 96
BATCH = 2


def model_args(**over: Any):
    values = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16,
        "train_micro_batch_size_per_gpu": BATCH, "train_iters": 10, "data_path": "x",
        "tokenizer_type": "CharLevelTokenizer",
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, **over,
    }
    return resolve_config(merge_configs([("t.yml", values)]),
                          RunFacts(world_size=1, launching=False)).model


def counted_flops(shape: ModelShape, *, recompute: bool) -> int:
    torch.manual_seed(0)
    h, heads, kv, d, ffn = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.ffn

    def weight(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims) * 0.02).requires_grad_()

    embedding = weight(shape.vocab, h)
    layers = [
        (weight(h, (heads + 2 * kv) * d), weight(heads * d, h),
         weight(h, ffn * (2 if shape.gated else 1)), weight(ffn, h))
        for _ in range(shape.layers)
    ]
    tokens = torch.randint(0, shape.vocab, (BATCH, shape.seq))
    causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool).triu(1)

    def layer(x: torch.Tensor, w_qkv: torch.Tensor, w_o: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (x @ w_qkv).split([heads * d, kv * d, kv * d], dim=-1)
        q = q.view(b, s, heads, d).transpose(1, 2)
        k = k.view(b, s, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        v = v.view(b, s, kv, d).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / d ** 0.5
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(b, s, heads * d)
        x = x + context @ w_o
        up = x @ w_up
        if shape.gated:
            gate, value = up.chunk(2, dim=-1)
            act = F.silu(gate) * value
        else:
            act = F.gelu(up)
        return x + act @ w_down

    # Recompute the whole layer, as reentrant (Megatron/DeepSpeed) checkpointing does; torch's
    # non-reentrant checkpoint would otherwise stop once the saved tensors are rebuilt and
    # skip the last projection.
    with FlopCounterMode(display=False) as counter, set_checkpoint_early_stop(False):
        x = embedding[tokens]
        for weights in layers:
            if recompute:
                x = checkpoint(layer, x, *weights, use_reentrant=False)
            else:
                x = layer(x, *weights)
        x = F.layer_norm(x, (h,))
        logits = x @ embedding.t()
        loss = F.cross_entropy(logits.view(-1, shape.vocab), tokens.view(-1))
        loss.backward()
    return counter.get_total_flops()


CASES = {
    "mha-gelu": {},
    "gqa-gelu": {"num_kv_heads": 2},
    "gqa-swiglu": {"num_kv_heads": 1, "activation": "swiglu", "intermediate_size": 40},
    "mha-geglu-3-layers": {"num_layers": 3, "activation": "geglu", "intermediate_size": 24},
}


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_per_token_matches_flop_counter(case: str, recompute: bool) -> None:
    args = model_args(**CASES[case])
    shape = ModelShape.from_config(args, VOCAB)
    counted = counted_flops(shape, recompute=recompute)
    tokens = BATCH * shape.seq
    assert flops_per_token(args, VOCAB, recompute=recompute) * tokens == counted


def test_shapes_change_the_count_as_expected() -> None:
    mha = model_args()
    gqa = model_args(num_kv_heads=2)
    h, d, seq = 32, 8, 16
    # K and V lose 2 heads each: 2 layers x 3 passes x 2 FLOPs x hidden x (2 + 2 heads) x d
    assert flops_per_token(mha, VOCAB) - flops_per_token(gqa, VOCAB) == 2 * 3 * 2 * h * 4 * d
    # recomputation adds exactly one forward of the layers, not of the vocabulary projection
    layer_forward = 2 * (h * 3 * h + h * h + 2 * h * 4 * h) + 4 * seq * h
    assert flops_per_token(mha, VOCAB, recompute=True) - flops_per_token(mha, VOCAB) == \
        2 * layer_forward
    vocab_cost = 3 * 2 * h * VOCAB
    assert flops_per_token(mha, 2 * VOCAB) - flops_per_token(mha, VOCAB) == vocab_cost
