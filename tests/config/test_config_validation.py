"""Every validation error is one line naming the file and the key."""

from __future__ import annotations

import pytest
from cfg_helpers import BASE, make_cfg

from megatron.neox_arguments import ConfigError, RunFacts, merge_configs, resolve_config


def err(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        make_cfg(**kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_close_matches():
    msg = err(hiden_size=64)
    assert msg.startswith("a.yml: hiden_size: unknown key")
    assert "hidden_size" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    assert err(zzzz_qqq=1) == "a.yml: zzzz_qqq: unknown key"


@pytest.mark.parametrize("key,value,fragment", [
    ("num_layers", "two", "expected int"),
    ("hidden_dropout", [0.1], "expected float"),
    ("no_weight_tying", "maybe", "expected bool"),
    ("norm", "batchnorm", "is not one of 'layernorm', 'rmsnorm', 'scalenorm'"),
    ("pos_emb", 3, "is not one of"),
    ("train_data_paths", {"a": 1}, "expected list"),
])
def test_wrong_type_or_choice(key, value, fragment):
    msg = err(**{key: value})
    assert msg.startswith(f"a.yml: {key}: ")
    assert fragment in msg


def test_choices_are_case_insensitive_and_numbers_may_be_strings():
    cfg = make_cfg(norm="RMSNorm", layernorm_epsilon="1e-6", num_layers=2.0)
    assert cfg.model.norm == "rmsnorm"
    assert cfg.model.layernorm_epsilon == pytest.approx(1e-6)
    assert cfg.model.num_layers == 2


def test_derived_keys_cannot_be_set():
    assert "is derived" in err(padded_vocab_size=128)


def test_unsupported_keys_accept_only_their_default():
    assert make_cfg(use_mup=False).model.use_mup is False
    assert err(use_mup=True) == "a.yml: use_mup: muP is not supported"


@pytest.mark.parametrize("key", ["num_layers", "hidden_size", "num_attention_heads", "seq_length"])
def test_missing_required_key(key):
    assert err(**{key: None}) == f"a.yml: {key}: required key is missing"


def test_missing_train_iters_only_matters_for_training():
    assert "train_iters: required for training" in err(train_iters=None)
    assert make_cfg(train_iters=None, purpose="generate").training.train_iters is None
    assert make_cfg(train_iters=None, train_epochs=2).training.train_epochs == 2


def test_hidden_not_divisible_by_heads():
    msg = err(hidden_size=70)
    assert msg == "a.yml: hidden_size: hidden_size 70 is not divisible by num_attention_heads 4"


def test_heads_and_kv_heads_divisible_by_model_parallel():
    assert "num_attention_heads 4 is not divisible by model_parallel_size 8" in \
        err(model_parallel_size=8, world_size=8)
    assert "num_kv_heads 1 is not divisible by model_parallel_size 2" in \
        err(num_kv_heads=1, model_parallel_size=2, world_size=2)
    assert "num_attention_heads 4 is not divisible by num_kv_heads 3" in err(num_kv_heads=3)


def test_vocab_is_padded_for_model_parallel():
    cfg = make_cfg(model_parallel_size=2, world_size=2, make_vocab_size_divisible_by=128)
    assert cfg.with_vocab_size(50257).tokenizer.padded_vocab_size == 50432  # 256 * 197
    assert cfg.with_vocab_size(256).tokenizer.padded_vocab_size == 256


def test_layers_vs_pipeline_stages():
    msg = err(num_layers=2, pipe_parallel_size=4, world_size=4)
    assert msg == "a.yml: num_layers: num_layers 2 is fewer than the 4 pipeline stages"


def test_world_size_divisible_by_pp_times_mp():
    msg = err(pipe_parallel_size=2, model_parallel_size=2, world_size=6)
    assert msg.startswith("a.yml: pipe_parallel_size: the launch has 6 ranks")
    assert "2 x 2" in msg


def test_batch_arithmetic_derives_the_third_value():
    cfg = make_cfg(world_size=4, train_batch_size=32, train_micro_batch_size_per_gpu=2)
    t = cfg.training
    assert (t.train_batch_size, t.train_micro_batch_size_per_gpu,
            t.gradient_accumulation_steps) == (32, 2, 4)
    cfg = make_cfg(world_size=4, train_batch_size=32, train_micro_batch_size_per_gpu=None,
                   gradient_accumulation_steps=2)
    assert cfg.training.train_micro_batch_size_per_gpu == 4
    cfg = make_cfg(world_size=4, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=5)
    assert cfg.training.train_batch_size == 60
    cfg = make_cfg(world_size=4, train_batch_size=8, train_micro_batch_size_per_gpu=None)
    assert (cfg.training.train_micro_batch_size_per_gpu,
            cfg.training.gradient_accumulation_steps) == (2, 1)
    # data parallel size counts pipeline and tensor parallel ranks out
    cfg = make_cfg(world_size=8, model_parallel_size=2, pipe_parallel_size=2,
                   train_batch_size=16, train_micro_batch_size_per_gpu=2)
    assert cfg.parallelism.data_parallel_size == 2
    assert cfg.training.gradient_accumulation_steps == 4


def test_batch_mismatch_names_all_three_and_dp():
    msg = err(world_size=2, train_batch_size=10, train_micro_batch_size_per_gpu=2,
              gradient_accumulation_steps=2)
    for piece in ("train_batch_size=10", "train_micro_batch_size_per_gpu=2",
                  "gradient_accumulation_steps=2", "data-parallel size=2"):
        assert piece in msg
    assert msg.startswith("a.yml: train_batch_size:")
    assert "not divisible" in err(world_size=2, train_batch_size=6,
                                  train_micro_batch_size_per_gpu=4)
    assert "set train_micro_batch_size_per_gpu" in err(train_micro_batch_size_per_gpu=None)


def test_zero_2_and_3_rejected_with_pipeline():
    for stage in (2, 3):
        msg = err(zero_optimization={"stage": stage}, pipe_parallel_size=1)
        assert msg.startswith("a.yml: zero_optimization: ")
        assert f"ZeRO stage {stage} cannot be combined with pipeline parallelism" in msg
    assert make_cfg(zero_optimization={"stage": 1}, pipe_parallel_size=1)
    assert make_cfg(zero_optimization={"stage": 3}, pipe_parallel_size=0)


def test_zero_block_keys_checked_by_deepspeed_schema():
    msg = err(zero_optimization={"stage": 1, "reduce_bucket_sise": 5})
    assert msg.startswith("a.yml: zero_optimization: reduce_bucket_sise:")
    assert "stage must be 0, 1, 2 or 3" in err(zero_optimization={"stage": 4})


def test_max_position_embeddings_smaller_than_seq_length():
    msg = err(max_position_embeddings=16)
    assert msg == ("a.yml: max_position_embeddings: max_position_embeddings 16 is smaller "
                   "than seq_length 32")


def test_conflicting_precision_blocks():
    assert "bf16.enabled and fp16.enabled are both true" in \
        err(fp16={"enabled": True}, bf16={"enabled": True})
    assert err(precision="fp32", bf16={"enabled": True}) == \
        "a.yml: precision: fp32 conflicts with bf16.enabled: true"
    assert make_cfg(precision="bf16").precision.precision == "bfloat16"
    assert make_cfg(bf16={"enabled": True}).precision.precision == "bfloat16"
    assert make_cfg(fp16={"enabled": False}).precision.precision == "fp32"


def test_fp16_on_cpu_is_a_launch_error_and_a_dry_run_warning():
    msg = err(fp16={"enabled": True}, launching=True)
    assert msg.startswith("a.yml: ") and "fp16 needs GPUs" in msg
    cfg = make_cfg(fp16={"enabled": True}, launching=False)
    assert any("fp16 needs GPUs" in w for w in cfg.warnings)
    assert make_cfg(fp16={"enabled": True}, gpu=True).precision.precision == "fp16"


def test_missing_data_and_tokenizer_files(tmp_path):
    msg = err(launching=True, data_path=str(tmp_path / "corpus"))
    assert msg == f"a.yml: data_path: dataset file {tmp_path / 'corpus'}.bin not found"
    (tmp_path / "corpus.bin").write_bytes(b"")
    (tmp_path / "corpus.idx").write_bytes(b"")
    assert make_cfg(launching=True, data_path=str(tmp_path / "corpus"))
    msg = err(launching=True, data_path=str(tmp_path / "corpus"), tokenizer_type="HFTokenizer",
              vocab_file=str(tmp_path / "tok.json"))
    assert msg == f"a.yml: vocab_file: file {tmp_path / 'tok.json'} not found"
    cfg = make_cfg(tokenizer_type="HFTokenizer", vocab_file="nope.json", launching=False)
    assert any("nope.json not found" in w for w in cfg.warnings)


def test_tokenizer_needs_its_files_named():
    assert err(tokenizer_type="HFTokenizer") == \
        "a.yml: tokenizer_type: HFTokenizer needs vocab_file"
    assert err(tokenizer_type="GPT2BPETokenizer", vocab_file="v.json") == \
        "a.yml: tokenizer_type: GPT2BPETokenizer needs merge_file"


def test_data_sources():
    assert "set either data_path" in err(train_data_paths=["x"])
    assert "training needs data_path or train_data_paths" in err(data_path=None)
    assert "has 1 weights for 2 train_data_paths" in err(
        data_path=None, train_data_paths=["a", "b"], train_data_weights=[1.0])
    assert "'1,x': give" in err(split="1,x") or "not comma-separated" in err(split="1,x")


def test_sparse_attention_fails_clearly():
    msg = err(attention_config=[[["sparse_fixed"], 2]])
    assert msg.startswith("a.yml: attention_config: 'sparse_fixed' attention needs DeepSpeed")
    assert "describes 3 layers but num_layers is 2" in err(attention_config=[[["global"], 3]])
    assert "sparsity" in err(sparsity="all")
    assert "sliding_window_width: required" in err(attention_config=[[["local"], 2]])


def test_optimizer_checks():
    assert "type 'adamm' is unknown (did you mean Adam" in \
        err(optimizer={"type": "adamm", "params": {"lr": 1}})
    assert "params.lr is missing" in err(optimizer={"type": "Adam", "params": {}})
    assert "required for training" in err(optimizer=None)
    assert make_cfg(optimizer={"type": "sgd", "params": {"lr": 0.1}}).optim.optimizer_type == "SGD"
    assert make_cfg(lr=0.5).optim.lr == 0.5


def test_aliases():
    assert make_cfg(clip_grad=0.5).training.gradient_clipping == 0.5
    assert make_cfg(checkpoint_factor=7).checkpoint.save_interval == 7
    assert "conflicts with save_interval" in err(checkpoint_factor=7, save_interval=8)


def test_range_checks():
    assert err(hidden_dropout=1.0) == "a.yml: hidden_dropout: must be in [0, 1), got 1.0"
    assert err(eval_interval=0) == "a.yml: eval_interval: must be at least 1, got 0"
    assert "needs an even number" in err(pos_emb="rotary", rotary_pct=0.1)


def test_derived_values():
    cfg = make_cfg(train_iters=100, apply_query_key_layer_scaling=True, geglu=True)
    assert cfg.lr.lr_decay_iters == 100
    assert cfg.model.max_position_embeddings == 32
    assert cfg.model.num_kv_heads == 4
    assert cfg.model.attention_softmax_in_fp32 is True
    assert cfg.model.activation == "geglu"
    assert make_cfg(train_iters=100, lr_decay_fraction=0.5).lr.lr_decay_iters == 50
    assert make_cfg(mlp_type="llama").model.activation == "swiglu"


def test_resolved_config_is_frozen_and_flat_lookup_works():
    cfg = make_cfg()
    with pytest.raises(AttributeError):
        cfg.model.hidden_size = 5  # type: ignore[misc]
    assert cfg.get("hidden-size") == 64
    assert cfg.flat()["train_iters"] == 10


def test_error_names_the_file_that_set_the_key():
    merged = merge_configs([("model.yml", {**BASE, "hidden_size": 64}),
                            ("override.yml", {"hidden_size": 66})])
    with pytest.raises(ConfigError, match=r"^override.yml: hidden_size: hidden_size 66"):
        resolve_config(merged, RunFacts(launching=False))


def test_mlp_width_divisible_by_model_parallel():
    msg = err(activation="swiglu", hidden_size=40, num_attention_heads=4, model_parallel_size=2,
              world_size=2)
    assert "the MLP width derived from hidden_size (53) is not divisible by model_parallel_size 2" in msg
    assert make_cfg(activation="swiglu", hidden_size=32, mlp_multiple_of=2,
                    model_parallel_size=2, world_size=2)
    assert "intermediate_size (90) is not divisible" in err(
        intermediate_size=90, model_parallel_size=4, world_size=4)


def test_tokenizer_files_are_only_required_for_a_job():
    cfg = make_cfg(purpose=None, tokenizer_type="GPT2BPETokenizer", data_path=None)
    assert cfg.tokenizer.vocab_file is None


def test_a_single_value_is_a_one_item_list():
    cfg = make_cfg(eval_tasks="lambada", train_data_weights=None)
    assert cfg.textgen.eval_tasks == ["lambada"]


def test_mlp_width_keys_as_gpt_neox_has_them():
    assert "either intermediate_size or expansion_factor" in err(
        intermediate_size=96, expansion_factor=2)
    # the two GPT-NeoX widths disagree (86 != 2 x 42): built 42 wide, with a warning
    cfg = make_cfg(activation="swiglu", hidden_size=32, num_attention_heads=4)
    assert [w for w in cfg.warnings if "first projection to 86" in w and "42 wide" in w]
    assert not [w for w in make_cfg(activation="swiglu", hidden_size=48,
                                    num_attention_heads=4).warnings if "first projection" in w]
