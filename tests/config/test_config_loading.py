"""Reading, merging and canonicalising config files."""

from __future__ import annotations

import json

import pytest

from megatron.neox_arguments import ConfigError, load_config_files
from megatron.neox_arguments.cli import parse_key_overrides
from megatron.neox_arguments.loader import MergedConfig, find_config_file


def write(path, text):
    path.write_text(text)
    return str(path)


def test_neox_style_yaml_comments_booleans_trailing_commas(tmp_path):
    f = write(tmp_path / "a.yml", """
# a comment
{
  "num-layers": 2,   # inline comment
  "no-weight-tying": True,
  "gpt_j_residual": False,
  "optimizer": {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95],},},
  "layernorm-epsilon": 1e-5,
}
""")
    merged = load_config_files([f])
    assert merged.values["num_layers"] == 2
    assert merged.values["no_weight_tying"] is True
    assert merged.values["gpt_j_residual"] is False
    assert merged.values["optimizer"]["params"]["lr"] == pytest.approx(6e-4)
    assert merged.values["optimizer"]["params"]["betas"] == [0.9, 0.95]
    # YAML 1.1 would read 1e-5 (no dot) as a string; we read it as a float
    assert isinstance(merged.values["layernorm_epsilon"], float)


def test_json_files_load(tmp_path):
    f = write(tmp_path / "a.json", json.dumps({"hidden-size": 64, "fp16": {"enabled": True}}))
    merged = load_config_files([f])
    assert merged.values == {"hidden_size": 64, "fp16": {"enabled": True}}


def test_dash_and_underscore_are_the_same_key(tmp_path):
    a = write(tmp_path / "a.yml", "hidden-size: 64\n")
    b = write(tmp_path / "b.yml", "hidden_size: 128\n")
    merged = load_config_files([a, b])
    assert merged.values["hidden_size"] == 128
    assert [o.key for o in merged.overrides] == ["hidden_size"]


def test_same_key_twice_in_one_file_is_an_error(tmp_path):
    f = write(tmp_path / "a.yml", "hidden-size: 64\nhidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"a.yml: hidden_size: set twice"):
        load_config_files([f])


def test_later_file_overrides_and_blocks_merge_key_by_key(tmp_path):
    a = write(tmp_path / "a.yml", """
seq_length: 128
zero_optimization: {stage: 1, reduce_bucket_size: 100, offload_optimizer: {device: cpu}}
""")
    b = write(tmp_path / "b.yml", """
seq_length: 256
zero_optimization: {stage: 2, offload_optimizer: {pin_memory: true}}
""")
    merged = load_config_files([a, b])
    assert merged.values["seq_length"] == 256
    assert merged.values["zero_optimization"] == {
        "stage": 2, "reduce_bucket_size": 100,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    }
    described = {o.key: o for o in merged.overrides}
    assert set(described) == {"seq_length", "zero_optimization.stage"}
    stage = described["zero_optimization.stage"]
    assert (stage.old, stage.new, stage.old_file, stage.new_file) == (1, 2, a, b)
    assert merged.sources["seq_length"] == b
    assert "seq_length: 128" in described["seq_length"].describe()


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yml: line \d+: invalid YAML"):
        load_config_files([f])


def test_top_level_must_be_a_mapping(tmp_path):
    f = write(tmp_path / "list.yml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yml: the top level must be a mapping"):
        load_config_files([f])


def test_find_config_without_suffix_and_conf_dir(tmp_path):
    (tmp_path / "125M.yml").write_text("num_layers: 12\n")
    assert find_config_file("125M", str(tmp_path)) == tmp_path / "125M.yml"
    assert find_config_file(str(tmp_path / "125M")) == tmp_path / "125M.yml"
    with pytest.raises(ConfigError, match="nope: config file not found"):
        find_config_file("nope", str(tmp_path))


def test_encode_decode_round_trip(tmp_path):
    a = write(tmp_path / "a.yml", "num_layers: 2\noptimizer: {type: Adam}\n")
    b = write(tmp_path / "b.yml", "num_layers: 4\n")
    merged = load_config_files([a, b])
    back = MergedConfig.decode(merged.encode())
    assert back.values == merged.values
    assert back.sources == merged.sources
    assert back.overrides == merged.overrides
    assert back.files == merged.files
    with pytest.raises(ConfigError, match="not an encoded config"):
        MergedConfig.decode("###")


def test_command_line_overrides():
    parsed = parse_key_overrides(["--train-iters", "20", "--eval_tasks", "a", "b",
                                  "--use_wandb", "--lr=0.5"])
    assert parsed == {"train_iters": 20, "eval_tasks": ["a", "b"], "use_wandb": True, "lr": 0.5}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_key_overrides(["stray"])


def test_optimizer_of_another_type_replaces_the_block(tmp_path):
    a = write(tmp_path / "a.yml", "optimizer: {type: Adam, params: {lr: 0.1, eps: 1.0e-8}}\n")
    b = write(tmp_path / "b.yml", "optimizer: {type: SGD, params: {lr: 0.5}}\n")
    c = write(tmp_path / "c.yml", "optimizer: {params: {momentum: 0.9}}\n")
    merged = load_config_files([a, b, c])
    assert merged.values["optimizer"] == {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}}
    assert [o.key for o in merged.overrides] == ["optimizer"]
