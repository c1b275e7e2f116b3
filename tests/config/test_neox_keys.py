"""GPT-NeoX keys whose effect is in the resolved config, the DeepSpeed dict or the run header,
and the GPT-NeoX settings refused at validation because they would be ignored or fail later."""

from __future__ import annotations

import pytest
from cfg_helpers import make_cfg

from megatron.neox_arguments import ConfigError, build_deepspeed_config
from megatron.neox_arguments.summary import summary_lines


def test_derived_parallel_keys() -> None:
    cfg = make_cfg(world_size=4, pipe_parallel_size=2)
    p = cfg.parallelism
    assert p.is_pipe_parallel and p.global_num_gpus == p.world_size == 4
    assert p.data_parallel_size == 2
    p = make_cfg(world_size=2).parallelism
    assert not p.is_pipe_parallel and p.global_num_gpus == 2
    with pytest.raises(ConfigError, match="global_num_gpus: is derived"):
        make_cfg(global_num_gpus=8)


def test_batch_size_is_the_micro_batch() -> None:
    cfg = make_cfg(world_size=2, train_micro_batch_size_per_gpu=None, batch_size=3)
    t = cfg.training
    assert t.train_micro_batch_size_per_gpu == 3 and t.train_batch_size == 6
    with pytest.raises(ConfigError, match="batch_size: conflicts with "
                       "train_micro_batch_size_per_gpu"):
        make_cfg(batch_size=5)  # the base sets a micro batch of 2


def test_output_layer_parallelism_is_column_only() -> None:
    assert make_cfg(output_layer_parallelism="column").model.output_layer_parallelism == "column"
    with pytest.raises(ConfigError, match="output_layer_parallelism: 'row' is not one of"):
        make_cfg(output_layer_parallelism="row")


def test_engine_blocks_reach_deepspeed() -> None:
    blocks = {
        "comms_logger": {"enabled": True, "verbose": False},
        "csv_monitor": {"enabled": True, "output_path": "csv/"},
        "activation_checkpointing": {"partition_activations": False},
        "tensorboard": {"enabled": True, "output_path": "tb/"},
        "wandb": {"enabled": False, "project": "p"},
        "checkpoint": {"use_node_local_storage": True},
    }
    cfg = make_cfg(dump_state=True, prescale_gradients=True, gradient_predivide_factor=2.0,
                   data_types={"grad_accum_dtype": "fp32"}, **blocks)
    ds = build_deepspeed_config(cfg)
    assert ds["dump_state"] is True and ds["prescale_gradients"] is True
    assert ds["gradient_predivide_factor"] == 2.0
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    for name, block in blocks.items():
        assert ds[name] == block, name
    ds = build_deepspeed_config(make_cfg())
    assert ds["dump_state"] is False and ds["prescale_gradients"] is False
    assert not set(blocks) & set(ds)


def test_scheduler_block_only_with_one_bit_adam() -> None:
    block = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    with pytest.raises(ConfigError) as info:
        make_cfg(scheduler=block)
    message = str(info.value)
    assert message.startswith("a.yml: scheduler: the DeepSpeed scheduler block is used only "
                              "with optimizer type OneBitAdam, not Adam")
    assert "lr_decay_style" in message and "\n" not in message
    cfg = make_cfg(gpu=True, scheduler=block,
                   optimizer={"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 5}})
    assert build_deepspeed_config(cfg, client_optimizer=False)["scheduler"] == block


def test_data_impl_cached_refused_at_validation() -> None:
    with pytest.raises(ConfigError, match="a.yml: data_impl: 'cached' .* use mmap or infer"):
        make_cfg(data_impl="cached")
    assert make_cfg(data_impl="mmap").data.data_impl == "mmap"


def test_one_bit_adam_refused_at_validation_on_cpu_and_gloo() -> None:
    one_bit = {"type": "OneBitAdam", "params": {"lr": 1e-3, "freeze_step": 5}}
    with pytest.raises(ConfigError, match="optimizer: OneBitAdam needs GPUs"):
        make_cfg(launching=True, optimizer=one_bit)
    with pytest.raises(ConfigError, match="OneBitAdam needs the nccl backend"):
        make_cfg(launching=True, gpu=True, optimizer=one_bit, distributed_backend="gloo")
    cfg = make_cfg(gpu=True, optimizer=one_bit)  # GPUs with nccl: accepted
    assert cfg.optim.optimizer_type == "OneBitAdam"
    # a dry run lists the problem as a warning
    assert any("OneBitAdam needs GPUs" in w for w in make_cfg(optimizer=one_bit).warnings)


def test_git_hash_in_the_run_header() -> None:
    assert not any(line.startswith("git hash") for line in summary_lines(make_cfg()))
    assert "git hash: 0123abc" in summary_lines(make_cfg(git_hash="0123abc"))


def test_user_script_and_config_files_are_recorded(tmp_path) -> None:
    import yaml
    from cfg_helpers import BASE

    from megatron.neox_arguments import RunFacts, load_config_files, resolve_config

    model, train = tmp_path / "model.yml", tmp_path / "train.yml"
    model.write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k != "train_iters"}))
    train.write_text("train_iters: 5\n")
    cfg = resolve_config(load_config_files([str(model), str(train)]),
                         RunFacts(launching=False, user_script="train.py"))
    assert cfg.other.user_script == "train.py"
    files = cfg.other.config_files
    assert files is not None and [n.rsplit("/", 1)[-1] for n in files] == ["model.yml",
                                                                          "train.yml"]
    assert list(files.values())[1] == "train_iters: 5\n"
    with pytest.raises(ConfigError, match="user_script: is derived"):
        make_cfg(user_script="x.py")


def test_pack_until_overflow_refused_with_a_reason() -> None:
    with pytest.raises(ConfigError, match="a.yml: pack_impl: 'pack_until_overflow' .* is not "
                       "provided; use packed or unpacked"):
        make_cfg(pack_impl="pack_until_overflow")
