"""GPT-NeoX's flat ZeRO and fp16 loss-scale keys reach DeepSpeed through its config dict; the
block wins where both name the same setting; bad values and impossible combinations are one
line. Also the checks of the keys that need an outside package (Comet, S3, bitsandbytes)."""

from __future__ import annotations

import sys

import pytest
from cfg_helpers import make_cfg

from megatron.neox_arguments import ConfigError, build_deepspeed_config


def test_zero_shortcuts_build_the_zero_block():
    cfg = make_cfg(world_size=2, zero_stage=2, zero_reduce_scatter=False,
                   zero_contiguous_gradients=True, zero_reduce_bucket_size=20_000_000,
                   zero_allgather_bucket_size=30_000_000)
    ds = build_deepspeed_config(cfg)
    assert ds["zero_optimization"] == {
        "stage": 2, "reduce_scatter": False, "contiguous_gradients": True,
        "reduce_bucket_size": 20_000_000, "allgather_bucket_size": 30_000_000}
    # everything downstream reads the one block
    assert cfg.ds.zero_optimization["stage"] == 2 and cfg.get("zero_stage") == 2


def test_zero_block_wins_over_a_differing_shortcut_and_fills_the_rest():
    block = {"stage": 1, "overlap_comm": True}
    cfg = make_cfg(world_size=2, zero_optimization=block, zero_stage=3,
                   zero_reduce_bucket_size=1000)
    ds = build_deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True,
                                       "reduce_bucket_size": 1000}
    assert cfg.get("zero_stage") == 1  # resolved to the stage in effect, as GPT-NeoX reads it
    assert any(w.startswith("zero_stage: 3 is overridden by zero_optimization.stage: 1")
               for w in cfg.warnings)
    # without shortcuts the block and the resolved values are DeepSpeed's
    plain = make_cfg()
    assert build_deepspeed_config(plain)["zero_optimization"] == {"stage": 0}
    assert (plain.get("zero_stage"), plain.get("zero_reduce_bucket_size")) == (0, 500_000_000)


def test_zero_stage_shortcut_is_checked_like_the_block():
    with pytest.raises(ConfigError, match="ZeRO stage 2 cannot be combined with pipeline"):
        make_cfg(world_size=2, zero_stage=2, pipe_parallel_size=2)
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3, got 5"):
        make_cfg(zero_stage=5)


def test_loss_scale_shortcuts_build_the_fp16_block():
    cfg = make_cfg(gpu=True, precision="fp16", loss_scale_window=500, hysteresis=4,
                   min_scale=0.5)
    fp16 = build_deepspeed_config(cfg)["fp16"]
    assert fp16 == {"loss_scale_window": 500, "hysteresis": 4, "min_loss_scale": 0.5,
                    "enabled": True}
    assert cfg.get("dynamic_loss_scale") is True
    static = make_cfg(gpu=True, precision="fp16", loss_scale=1024, dynamic_loss_scale=False)
    assert build_deepspeed_config(static)["fp16"] == {"loss_scale": 1024, "enabled": True}
    assert static.get("dynamic_loss_scale") is False
    dynamic = make_cfg(gpu=True, precision="fp16", dynamic_loss_scale=True)
    assert build_deepspeed_config(dynamic)["fp16"] == {"loss_scale": 0, "enabled": True}


def test_fp16_block_wins_over_loss_scale_shortcuts():
    cfg = make_cfg(gpu=True, fp16={"enabled": True, "loss_scale": 0, "hysteresis": 2},
                   loss_scale=128, hysteresis=8, loss_scale_window=200)
    fp16 = build_deepspeed_config(cfg)["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "hysteresis": 2, "loss_scale_window": 200}
    assert cfg.get("dynamic_loss_scale") is True
    assert sum("is overridden by fp16." in w for w in cfg.warnings) == 2


@pytest.mark.parametrize("values, match", [
    ({"precision": "fp16", "loss_scale": -1}, "loss_scale: must be 0 .dynamic. or positive"),
    ({"precision": "fp16", "hysteresis": 0}, "hysteresis: must be at least 1"),
    ({"precision": "fp16", "min_scale": 0}, "min_scale: must be positive"),
    ({"precision": "fp16", "dynamic_loss_scale": True, "loss_scale": 64},
     "conflicts with the static loss_scale 64"),
    ({"precision": "fp16", "dynamic_loss_scale": False}, "needs a positive loss_scale"),
])
def test_bad_loss_scale_values_are_one_line(values, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_cfg(gpu=True, **values)
    assert "\n" not in str(info.value) and str(info.value).startswith("a.yml: ")


def test_loss_scale_shortcuts_without_fp16_are_a_warning():
    cfg = make_cfg(precision="bfloat16", loss_scale=512)
    assert "fp16" not in build_deepspeed_config(cfg)
    assert any(w.startswith("loss_scale: fp16 loss scaling only") for w in cfg.warnings)


def test_service_keys_need_their_packages(monkeypatch):
    for module, values, match in [
        ("comet_ml", {"use_comet": True}, "use_comet: needs the comet_ml package"),
        ("boto3", {"s3_path": "s3://b/p", "save": "ck"}, "s3_path: needs the boto3 package"),
        ("bitsandbytes", {"use_bnb_optimizer": True, "pos_emb": "rotary"},
         "use_bnb_optimizer: needs the bitsandbytes package"),
    ]:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, module, None)  # `import module` fails
            with pytest.raises(ConfigError, match=match):
                make_cfg(**values)


@pytest.mark.parametrize("values, match", [
    ({"s3_path": "bucket/x", "save": "ck"}, "'bucket/x' is not an s3://bucket"),
    ({"s3_path": "s3://b"}, "uploads saved checkpoints: set save"),
    ({"s3_chunk_size": 1024}, "S3 takes parts of 5 MiB"),
    ({"use_bnb_optimizer": True, "optimizer": {"type": "Lion", "params": {"lr": 1e-3}},
      "pos_emb": "rotary"}, "for optimizer.type Adam or AdamW, not Lion"),
    ({"use_bnb_optimizer": True, "pos_emb": "learned"}, "StableEmbedding"),
])
def test_service_keys_bad_values(values, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(**values)
