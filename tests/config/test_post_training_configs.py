"""GPT-NeoX's post-training example configs (copies in neox_post_training/, origin in each
header) load and resolve, and post-training keys are checked against each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.neox_arguments import ConfigError, RunFacts, merge_configs, resolve_config
from megatron.neox_arguments.loader import read_config_file

HERE = Path(__file__).resolve().parent
EXPECTED = {"llama3-8b-dpo.yml": ("dpo", "pairwise"), "llama3-8b-kto.yml": ("kto", "gpt2"),
            "llama3-8b-rm.yml": ("rm", "pairwise"), "llama3-8b-sft.yml": ("normal", "gpt2")}


def _resolve(values: dict, world_size: int = 4):
    merged = merge_configs([("a.yml", values)])
    return resolve_config(merged, RunFacts(world_size=world_size, gpu=True, launching=False,
                                           purpose="train"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_neox_post_training_configs_load(name):
    values = read_config_file(HERE / "neox_post_training" / name)
    cfg = _resolve(values)
    impl, dataset = EXPECTED[name]
    assert cfg.posttrain.train_impl == impl
    assert cfg.data.dataset_impl == dataset
    assert cfg.data.pack_impl == "unpacked"
    assert cfg.data.allow_chopped is (impl == "normal")  # the SFT config leaves the default
    if impl == "dpo":
        assert cfg.posttrain.dpo_beta == 0.01 and cfg.posttrain.dpo_fp32
        assert cfg.posttrain.neg_train_label_data_paths == [
            "data/pairwise/llama3_dpo_train_rejected_label_document"]
    if impl == "kto":
        assert cfg.posttrain.kto_beta == 0.1
        assert cfg.posttrain.train_reward_data_paths == [
            "data/kto/llama3_train_messages_reward_document"]


BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32,
        "train_micro_batch_size_per_gpu": 2, "train_iters": 10,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001}},
        "tokenizer_type": "CharLevelTokenizer"}


@pytest.mark.parametrize("values, names", [
    ({"train_impl": "dpo", "data_path": "d"}, ("train_impl", "dataset_impl")),
    ({"train_impl": "kto", "train_data_paths": ["d"]}, ("train_reward_data_paths",)),
    ({"dataset_impl": "pairwise", "pos_train_data_paths": ["a", "b"],
      "neg_train_data_paths": ["c"]}, ("neg_train_data_paths",)),
    ({"pack_impl": "unpacked", "data_path": "d"}, ("pack_impl", "data_path")),
    ({"lora_rank": 4, "lora_target_modules": ["mlp"], "data_path": "d"}, ("lora_target_modules",)),
    ({"train_impl": "orpo", "dataset_impl": "pairwise", "pos_train_data_paths": ["a"],
      "neg_train_data_paths": ["b"], "pipe_parallel_size": 1}, ("pipe_parallel_size",)),
    ({"train_impl": "rm", "dataset_impl": "pairwise", "pos_train_data_paths": ["a"],
      "neg_train_data_paths": ["b"], "pipe_parallel_size": 1}, ("pipe_parallel_size",
                                                                "GPT-NeoX")),
    ({"z_loss": 1e-4, "data_path": "d", "pipe_parallel_size": 1}, ("z_loss",
                                                                   "pipe_parallel_size")),
])
def test_post_training_keys_are_checked(values, names):
    with pytest.raises(ConfigError) as err:
        _resolve({**BASE, **values}, world_size=1)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    for name in names:
        assert name in message


def test_lora_runs_over_pipeline_stages():
    cfg = _resolve({**BASE, "lora_rank": 4, "data_path": "d", "pipe_parallel_size": 2},
                   world_size=2)
    assert cfg.posttrain.lora_rank == 4 and cfg.parallelism.pipe_parallel_size == 2
