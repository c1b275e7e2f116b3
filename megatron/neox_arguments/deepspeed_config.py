"""The one function that turns a resolved config into DeepSpeed's config dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig

# DeepSpeed blocks copied verbatim when the user set them.
_PASSTHROUGH = (
    "flops_profiler", "autotuning", "comms_logger", "tensorboard", "wandb", "csv_monitor",
    "data_efficiency", "checkpoint", "activation_checkpointing",
)  # fmt: skip

# the keys of DeepSpeed's bf16 block; GPT-NeoX configs (RWKV's, for one) copy the fp16 block's
# loss-scaling keys into it, which mean nothing for bf16 and which DeepSpeed refuses
BF16_KEYS = ("enabled", "immediate_grad_update", "check_grad_overflow",
             "bf16_master_weights_and_grads", "bf16_optimizer_states")


def build_deepspeed_config(cfg: NeoXConfig, *, client_optimizer: bool = True) -> dict[str, Any]:
    """DeepSpeed's config dict for ``deepspeed.initialize``.

    With ``client_optimizer`` (the default) the trainer builds the optimizer and LR schedule
    from the ``optimizer`` block and the ``lr_*`` keys and hands them to DeepSpeed, so the
    ``optimizer`` and ``scheduler`` blocks are left out; without it they are passed through
    for DeepSpeed to build.
    """
    t, ds, prec = cfg.training, cfg.ds, cfg.precision
    out: dict[str, Any] = {
        "train_batch_size": t.train_batch_size,
        "train_micro_batch_size_per_gpu": t.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "steps_per_print": ds.steps_per_print,
        "wall_clock_breakdown": ds.wall_clock_breakdown,
        "dump_state": ds.dump_state,
        "prescale_gradients": ds.prescale_gradients,
        "gradient_predivide_factor": ds.gradient_predivide_factor,
        "zero_allow_untested_optimizer": cfg.optim.zero_allow_untested_optimizer,
        "zero_optimization": dict(ds.zero_optimization or {"stage": 0}),
    }
    fp16 = dict(prec.fp16 or {})
    bf16 = {k: v for k, v in (prec.bf16 or {}).items() if k in BF16_KEYS}
    fp16["enabled"] = prec.precision == "fp16"
    bf16["enabled"] = prec.precision == "bfloat16"
    if fp16["enabled"] or prec.fp16 is not None:
        out["fp16"] = fp16
    if bf16["enabled"] or prec.bf16 is not None:
        out["bf16"] = bf16
    if prec.communication_data_type is not None:
        out["communication_data_type"] = prec.communication_data_type
    elif prec.fp32_allreduce:
        out["communication_data_type"] = "fp32"
    if prec.data_types is not None:
        out["data_types"] = dict(prec.data_types)
    for name in _PASSTHROUGH:
        value = getattr(ds, name)
        if value is not None:
            out[name] = value
    if not client_optimizer:
        if cfg.optim.optimizer is not None:
            block = dict(cfg.optim.optimizer)
            params = dict(block.get("params") or {})
            if cfg.optim.lr is not None:
                params["lr"] = cfg.optim.lr
            block["params"] = params
            out["optimizer"] = block
        if ds.scheduler is not None:
            out["scheduler"] = ds.scheduler
    if ds.deepspeed_extra_args:
        out.update(ds.deepspeed_extra_args)
    return out
