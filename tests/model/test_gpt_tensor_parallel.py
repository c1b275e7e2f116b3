"""TP=2 against TP=1 from the same seed on 2 gloo ranks (fp32): gathered logits, loss and
every parameter's gradient, with and without sequence parallelism."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing import assert_close

from megatron.model import gather_logits, lm_loss
from megatron.neox_arguments import padded_vocab_size
from megatron.parallel import (
    ParallelState,
    RankTopology,
    split_tensor,
)
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import VOCAB, batch, build, document_mask, load_tiny, make_config

TIGHT = {"rtol": 1e-4, "atol": 2e-6}

CASES: dict[str, tuple[str | None, dict[str, Any], bool]] = {
    # name: (tiny config file or None for the test base, overrides, document mask)
    "neox": ("tiny_neox", {"seq_length": 32, "max_position_embeddings": 32}, False),
    "llama": ("tiny_llama", {"seq_length": 32, "max_position_embeddings": 32}, False),
    "alibi-qknorm-local-tied": (None, {
        "pos_emb": "alibi", "num_attention_heads": 8, "use_qk_layernorm": True,
        "attention_config": [[["local", "global"], 2]], "sliding_window_width": 6,
        "activation": "geglu", "intermediate_size": 48,
    }, True),
    "rpe-rmsnorm-post-ln": (None, {
        "pos_emb": "rpe", "rpe_num_buckets": 8, "rpe_max_distance": 16, "norm": "rmsnorm",
        "apply_residual_connection_post_layernorm": True, "use_qk_layernorm": True,
        "apply_query_key_layer_scaling": True, "bias_dropout_fusion": True,
    }, False),
    "learned-swiglu-gqa-shared": (None, {
        "pos_emb": "learned", "activation": "swiglu", "num_kv_heads": 2, "num_layers": 4,
        "num_unique_layers": 2, "param_sharing_style": "spaced", "intermediate_size": 48,
    }, False),
    "moe-swiglu-aux": (None, {
        "activation": "swiglu", "intermediate_size": 48, "moe_num_experts": 4, "moe_top_k": 2,
        "moe_router_type": "topk", "moe_expert_interval": 2, "num_layers": 4,
        "moe_aux_loss_coeff": 0.1, "moe_z_loss_coeff": 0.01,
    }, False),
}  # fmt: skip


def _config(name: str) -> Any:
    file, overrides, _ = CASES[name]
    return load_tiny(file, **overrides) if file else make_config(**overrides)


def _expected_shard(full: torch.Tensor, param: torch.Tensor, rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return split_tensor(full, param.partition_dim, 2, rank, param.partition_stride)


def _tp2_vs_tp1(rank: int, world: int, names: list[str]) -> list[str]:
    base = ParallelState.initialize(RankTopology(2, 2, 1))
    checked = []
    for name in names:
        cfg = _config(name)
        with_docs = CASES[name][2]
        vocab = padded_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, 2)
        seq = cfg.model.seq_length
        tokens, labels, loss_mask = batch(2, seq, seed=7)
        mask, positions = document_mask(tokens, [seq // 3, seq // 2]) if with_docs else (None, None)
        dense = build(cfg, seed=11, padded_vocab=vocab)
        dense_logits = dense(tokens, positions, mask)
        dense_loss = lm_loss(dense_logits, labels, loss_mask, ParallelState.single())
        dense_loss.backward()
        for sp in (False, True):
            state = base.with_sequence_parallel(sp)
            par = build(cfg, seed=11, state=state, padded_vocab=vocab)
            assert par.sequence_parallel == sp
            # the embedding and the output layer split the padded vocabulary
            emb = par.embed.word_embeddings
            assert emb.weight.shape[0] == vocab // 2 and emb.vocab_start == rank * vocab // 2
            assert par.output_weight.shape == (vocab // 2, cfg.model.hidden_size)
            logits = par(tokens, positions, mask)
            assert logits.shape == (2, seq, vocab // 2)
            loss = lm_loss(logits, labels, loss_mask, state)
            loss.backward()
            where = f"{name} sp={sp} rank={rank}"
            assert_close(gather_logits(logits, state), dense_logits, **TIGHT, msg=where)
            assert_close(loss, dense_loss, **TIGHT, msg=where)
            dense_params = dict(dense.named_parameters())
            for pname, p in par.named_parameters():
                full = dense_params[pname]
                assert_close(p, _expected_shard(full, p, rank), rtol=0, atol=0, msg=pname)
                assert p.grad is not None, f"{where}: {pname} has no gradient"
                expected = _expected_shard(full.grad, p, rank)
                assert_close(p.grad, expected, **TIGHT, msg=f"{where}: {pname}")
            checked.append(where)
    return checked


@pytest.mark.distributed
def test_tensor_parallel_model_matches_single_rank_model() -> None:
    names = list(CASES)
    results = run_distributed(_tp2_vs_tp1, 2, names, timeout=240)
    assert len(results[0]) == len(results[1]) == 2 * len(names)
