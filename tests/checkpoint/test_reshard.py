"""megatron/checkpoint/reshard.py: split rules read from the layers, merging and splitting
tensor-parallel shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron.checkpoint import reshard
from megatron.checkpoint.reshard import (
    REPLICATED,
    Partition,
    merge_tp_shards,
    partition_of,
    split_rules,
    split_tp,
)
from megatron.model import GPTModel
from megatron.parallel import ParallelState
from tests.checkpoint.checkpoint_helpers import CONFIGS, build, config_from_values

# every kind of parameter: norms with and without bias, ScaleNorm, learned positions, the RPE
# table, query/key norms, gated and plain MLPs, biases on and off, shared layers
EVERY_KIND = {
    **CONFIGS,
    "scalenorm_shared_sinusoidal": dict(norm="scalenorm", pos_emb="sinusoidal", num_layers=4,
                                        num_unique_layers=2, use_bias_in_attn_linear=False),
    "layernorm_nobias_alibi": dict(pos_emb="alibi", use_bias_in_norms=False,
                                   use_bias_in_mlp=False, activation="reglu",
                                   intermediate_size=48),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_partition_rules_match_the_layers_attributes(name):
    cfg = config_from_values(world_size=2, model_parallel_size=2, **CONFIGS[name])
    model = build(cfg, 2, 1)
    checked = 0
    for pname, param in model.named_parameters():
        rule = partition_of(pname, cfg.model)
        if getattr(param, "tensor_model_parallel", False):
            assert (rule.dim, rule.stride) == (param.partition_dim, param.partition_stride), pname
            checked += 1
        else:
            assert rule.dim is None, pname
    assert checked >= 5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tp2_shards_merge_into_the_tp1_model(name):
    """Modules built with TP=2 from one seed hold exactly the slices of TP=1 from that seed."""
    cfg1 = config_from_values(**CONFIGS[name])
    cfg2 = config_from_values(world_size=2, model_parallel_size=2, **CONFIGS[name])
    assert cfg1.tokenizer.padded_vocab_size == cfg2.tokenizer.padded_vocab_size
    full = build(cfg1).state_dict()
    shards = [build(cfg2, 2, r).state_dict() for r in range(2)]
    merged = merge_tp_shards(shards, cfg2.model)
    assert merged.keys() == full.keys()
    for key in full:
        assert torch.equal(merged[key], full[key]), key
    for got, want in zip(split_tp(full, cfg2.model, 2), shards):
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", sorted(EVERY_KIND))
def test_every_parameter_records_its_split(name):
    cfg = config_from_values(**EVERY_KIND[name])
    model = build(cfg)
    for pname, param in model.named_parameters():
        assert isinstance(getattr(param, "partition_dim", None), int), pname
        assert getattr(param, "partition_stride", 0) >= 1, pname
    rules = split_rules(cfg.model)
    assert rules.keys() == model.state_dict().keys()


def test_rules_cover_strides_heads_and_replicated_entries():
    gated = split_rules(config_from_values(**CONFIGS["llama_rpe_untied"]).model)
    assert gated["layers.1.mlp.dense_h_to_4h.weight"] == Partition(0, 2)
    assert gated["layers.1.mlp.dense_h_to_4h.bias"] == Partition(0, 2)
    assert gated["rpe.relative_attention_bias.weight"] == Partition(1)
    assert gated["output_layer.weight"] == Partition(0)
    assert gated["layers.0.mlp.dense_4h_to_h.bias"] == REPLICATED
    ungated = {**CONFIGS["learned_geglu"], "activation": "gelu"}
    plain = split_rules(config_from_values(**ungated).model)
    assert plain["layers.0.mlp.dense_h_to_4h.weight"] == Partition(0, 1)
    assert plain["layers.0.attention.q_norm.weight"] == REPLICATED
    assert plain["embed.position_embeddings.weight"] == REPLICATED
    assert plain["layers.0.attention.query_key_value.bias"] == Partition(0)
    buffers = split_rules(config_from_values(rotary_save_freqs_buffer=True).model)
    assert buffers["layers.1.attention.rotary_emb.inv_freq"] == REPLICATED
    assert partition_of("not.in.the.model", config_from_values().model) == REPLICATED


def test_reading_the_rules_draws_no_random_numbers_and_builds_on_meta():
    cfg = config_from_values(**CONFIGS["llama_rpe_untied"], init_method="orthogonal")
    torch.manual_seed(11)
    before = torch.get_rng_state()
    split_rules(cfg.model)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.device("meta"):
        model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=512,
                         state=ParallelState.single())
    assert all(p.is_meta for p in model.parameters())


def test_a_parameter_without_split_attributes_is_reported(monkeypatch):
    class WithStrayParameter(GPTModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.stray = nn.Parameter(torch.zeros(3))

    monkeypatch.setattr(reshard, "GPTModel", WithStrayParameter)
    with pytest.raises(TypeError, match="parameter stray has no partition_dim"):
        split_rules(config_from_values().model)
