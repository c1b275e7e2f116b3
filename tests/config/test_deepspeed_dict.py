"""The DeepSpeed config dict built from a resolved config."""

from __future__ import annotations

import pytest
from cfg_helpers import make_cfg

from megatron.neox_arguments import build_deepspeed_config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_pass_through(stage):
    block = {"stage": stage, "reduce_bucket_size": 1000, "overlap_comm": True}
    if stage == 3:
        block["offload_param"] = {"device": "cpu"}
    ds = build_deepspeed_config(make_cfg(world_size=2, zero_optimization=block))
    assert ds["zero_optimization"] == block
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 1


def test_default_is_stage_0_fp32():
    ds = build_deepspeed_config(make_cfg())
    assert ds["zero_optimization"] == {"stage": 0}
    assert "fp16" not in ds and "bf16" not in ds
    assert "optimizer" not in ds and "scheduler" not in ds


def test_bf16_block():
    ds = build_deepspeed_config(make_cfg(bf16={"enabled": True}))
    assert ds["bf16"] == {"enabled": True}
    assert "fp16" not in ds
    ds = build_deepspeed_config(make_cfg(precision="bfloat16"))
    assert ds["bf16"] == {"enabled": True}


def test_fp16_block_keeps_loss_scaling_settings():
    block = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
             "min_loss_scale": 1, "initial_scale_power": 12}
    ds = build_deepspeed_config(make_cfg(gpu=True, fp16=block))
    assert ds["fp16"] == block
    assert "bf16" not in ds
    # precision key switches the block on even if the file only tuned it
    ds = build_deepspeed_config(make_cfg(gpu=True, precision="fp16",
                                         fp16={"loss_scale_window": 100}))
    assert ds["fp16"] == {"loss_scale_window": 100, "enabled": True}


def test_disabled_block_stays_disabled():
    ds = build_deepspeed_config(make_cfg(fp16={"enabled": False}))
    assert ds["fp16"] == {"enabled": False}


def test_optimizer_block_only_when_deepspeed_builds_it():
    # validation refuses a scheduler block beside a trainer-built optimizer; the dict builder is
    # checked on a config given one directly
    cfg = make_cfg(optimizer={"type": "Adam", "params": {"lr": 0.1, "betas": [0.9, 0.99]}},
                   lr=0.2).replace_section("ds", scheduler={"type": "WarmupLR", "params": {}})
    assert "optimizer" not in build_deepspeed_config(cfg)
    ds = build_deepspeed_config(cfg, client_optimizer=False)
    assert ds["optimizer"] == {"type": "Adam", "params": {"lr": 0.2, "betas": [0.9, 0.99]}}
    assert ds["scheduler"] == {"type": "WarmupLR", "params": {}}


def test_other_engine_settings():
    cfg = make_cfg(gradient_clipping=0.5, steps_per_print=7, wall_clock_breakdown=True,
                   zero_allow_untested_optimizer=True, fp32_allreduce=True,
                   flops_profiler={"enabled": True, "profile_step": 3},
                   deepspeed_extra_args={"memory_breakdown": True})
    ds = build_deepspeed_config(cfg)
    assert ds["gradient_clipping"] == 0.5
    assert ds["steps_per_print"] == 7
    assert ds["wall_clock_breakdown"] is True
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["communication_data_type"] == "fp32"
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 3}
    assert ds["memory_breakdown"] is True


def test_deepspeed_accepts_the_dict():
    """DeepSpeed's own config parser takes what we build (ZeRO 3 + bf16, accumulation)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = make_cfg(world_size=1, train_batch_size=8, train_micro_batch_size_per_gpu=2,
                   bf16={"enabled": True}, zero_optimization={"stage": 3})
    parsed = DeepSpeedConfig(build_deepspeed_config(cfg))  # no process group: world size 1
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == 3
    assert parsed.bfloat16_config.enabled


def test_a_bf16_block_with_loss_scaling_keys_is_accepted_by_deepspeed():
    """GPT-NeoX's RWKV configs copy the fp16 block's loss-scaling keys into the bf16 block;
    DeepSpeed refuses them there. They are dropped with one warning."""
    from deepspeed.runtime.config import DeepSpeedConfig

    block = {"bf16": True, "enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1}
    cfg = make_cfg(world_size=1, train_batch_size=8, train_micro_batch_size_per_gpu=2,
                   bf16=block)
    ds = build_deepspeed_config(cfg)
    assert ds["bf16"] == {"enabled": True}
    assert DeepSpeedConfig(ds).bfloat16_config.enabled
    assert [w for w in cfg.warnings if w.startswith("bf16: hysteresis, initial_scale_power, "
                                                    "loss_scale, loss_scale_window, "
                                                    "min_loss_scale (loss scaling)")]
