"""Config sections for the optimizer, LR schedule, training loop, checkpoints and precision."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

from megatron.neox_arguments.fields import key

# The te_* keys act only where the transformer_engine package is importable (and the ranks
# are GPU ranks, checked before launch); elsewhere a non-default value is refused in one line.
_TE_IMPORTABLE = importlib.util.find_spec("transformer_engine") is not None
_NO_TE = None if _TE_IMPORTABLE else (
    "Transformer Engine layers are not provided here: they need the transformer_engine package "
    "(not installed) and GPU ranks; FP8 linear layers without it come from torchao: set "
    "fp8_training: true (see docs/gpu.md)")
_NO_TE_FP8 = None if _TE_IMPORTABLE else (
    "Transformer Engine FP8 (delayed scaling) is not provided and is not mapped onto torchao's "
    "dynamic scaling: it needs the transformer_engine package (not installed) and GPU ranks; "
    "set fp8_training: true and fp8_recipe (see docs/gpu.md)")

OPTIMIZER_TYPES = (
    "Adam", "AdamW", "SGD", "Lion", "SM3", "CPU_Adam", "CPU_torch_adam", "OneBitAdam",
    "madgrad_wd",
)  # fmt: skip


@dataclass(frozen=True)
class OptimizerArgs:
    optimizer: dict | None = key(
        None, "Optimizer block: {type: Adam|AdamW|SGD|Lion|SM3|CPU_Adam|CPU_torch_adam|"
        "OneBitAdam, params: {lr, betas, eps, ...}}. The trainer builds it and hands it to "
        "DeepSpeed.", origin="DSC")
    zero_allow_untested_optimizer: bool = key(
        False, "Allow ZeRO with optimizers DeepSpeed has not tested (SGD, Lion, SM3, ...).",
        origin="DSC")
    lr: float | None = key(None, "Peak learning rate; unset takes optimizer.params.lr.")
    weight_decay: float = key(0.01, "Decoupled weight decay (not applied to biases and norms).",
                              origin="Meg")
    use_bnb_optimizer: bool = key(
        False, "optimizer.type Adam/AdamW runs as bitsandbytes' 8-bit Adam (Adam8bit: "
        "block-wise quantized moments, decoupled weight decay; parameters under 4096 "
        "elements keep 32-bit state). Needs the bitsandbytes package.")
    optimizer_type: str = key("Adam", "The optimizer block's type.", derived=True)


@dataclass(frozen=True)
class LRArgs:
    lr_decay_style: Literal["constant", "linear", "cosine", "exponential"] = key(
        "linear", "Learning-rate decay after warmup.", origin="Meg")
    lr_decay_iters: int | None = key(None, "Iterations to decay over; defaults to train_iters "
                                     "(times lr_decay_fraction when that is set).", origin="Meg")
    lr_decay_fraction: float | None = key(
        None, "Decay over this fraction of train_iters when lr_decay_iters is unset.")
    min_lr: float = key(0.0, "Floor of the decayed learning rate.", origin="Meg")
    warmup: float = key(0.01, "Warmup length as a fraction of the decay iterations.",
                        origin="Meg")
    override_lr_scheduler: bool = key(
        False, "Ignore the scheduler state in a loaded checkpoint and use the config's values.",
        origin="Meg")
    use_checkpoint_lr_scheduler: bool = key(
        False, "Take the scheduler's values from the loaded checkpoint instead of the config.",
        origin="Meg")
    decay_lr_to: float | None = key(
        None, "Set by GPT-NeoX's Llemma configs: decay to this fraction of the peak lr.",
        unsupported="not one of GPT-NeoX's arguments (its Llemma configs set it): set min_lr "
        "to the peak lr times this fraction")
    warmup_iters: int | None = key(
        None, "Set by GPT-NeoX's Llemma configs: warmup length in iterations.",
        unsupported="not one of GPT-NeoX's arguments (its Llemma configs set it): set warmup "
        "to these iterations as a fraction of lr_decay_iters")


@dataclass(frozen=True)
class TrainingArgs:
    train_iters: int | None = key(None, "Optimizer steps to train for (over all runs).",
                                  origin="Meg")
    train_epochs: int | None = key(
        None, "Train for this many passes over the training data instead of train_iters.")
    train_batch_size: int | None = key(
        None, "Global batch size in samples: micro batch x gradient accumulation x data-parallel "
        "size. Any two of the three determine the third.", origin="DSC")
    train_micro_batch_size_per_gpu: int | None = key(
        None, "Samples each rank processes per forward/backward.", origin="DSC")
    gradient_accumulation_steps: int | None = key(
        None, "Micro batches accumulated per optimizer step.", origin="DSC")
    batch_size: int | None = key(None, "GPT-NeoX name of train_micro_batch_size_per_gpu.")
    gradient_clipping: float = key(1.0, "Clip the global gradient norm to this (0 disables).",
                                   origin="DSC")
    clip_grad: float | None = key(None, "Megatron name of gradient_clipping.", origin="Meg")
    eval_interval: int = key(1000, "Evaluate on the validation set every this many iterations.",
                             origin="Meg")
    eval_iters: int = key(100, "Batches per evaluation.", origin="Meg")
    exit_interval: int | None = key(None, "Stop (after saving) when the iteration is a multiple "
                                    "of this.", origin="Meg")
    seed: int = key(1234, "Seed of python, numpy and torch RNGs and of data shuffling.",
                    origin="Meg")
    do_train: bool = key(True, "Run training.")
    do_valid: bool = key(True, "Evaluate on the validation set.")
    do_test: bool = key(True, "Evaluate on the test set at the end.")
    max_consecutive_skipped_iters: int = key(
        10, "Stop with an error after this many optimizer steps in a row were skipped for a "
        "non-finite loss or gradient norm (bf16/fp32).", origin="Here")
    save_on_signal: bool = key(
        True, "On SIGTERM/SIGINT, save a checkpoint at the next step boundary and exit 0.",
        origin="Here")
    peak_theoretical_tflops: float | None = key(
        None, "Dense peak TFLOP/s of one device for MFU; unset looks the device up in a table.",
        origin="Here")
    inject_nonfinite_loss_iters: list[int] | None = key(
        None, "Fault injection for testing the skip path: one rank's loss becomes NaN at these "
        "iterations.", origin="Here")
    inject_kill_during_save_iters: list[int] | None = key(
        None, "Fault injection for testing atomic checkpoints: rank 0 kills itself (SIGKILL) "
        "while saving at these iterations, after the weights are written and before the "
        "checkpoint is marked complete.", origin="Here")
    iteration: int | None = key(
        None, "Load the checkpoint of this iteration (global_stepN in the load directory) "
        "instead of the one 'latest' names.")


@dataclass(frozen=True)
class CheckpointArgs:
    save: str | None = key(None, "Directory to save checkpoints to.", origin="Meg")
    load: str | None = key(None, "Directory to load a checkpoint from.", origin="Meg")
    save_interval: int | None = key(None, "Save every this many iterations.", origin="Meg")
    checkpoint_factor: int | None = key(None, "NeoX name for save_interval (with "
                                        "checkpoint_scale).")
    checkpoint_scale: Literal["linear", "log"] = key(
        "linear", "linear: save every checkpoint_factor steps; log: at powers of "
        "checkpoint_factor.")
    extra_save_iters: list[int] | None = key(None, "Additional iterations to save at.")
    keep_last_n_checkpoints: int | None = key(None, "Delete older checkpoints, keeping this "
                                              "many.")
    async_save: bool = key(
        False, "Write checkpoints in a background thread: training waits only while the state "
        "is copied to host memory; the files, the manifest and 'latest' follow in order, and "
        "the next save, a stop on a signal and the end of the run wait for the write.",
        origin="Meg")
    no_save_optim: bool = key(False, "Leave the optimizer state out of checkpoints.",
                              origin="Meg")
    no_save_rng: bool = key(False, "Leave RNG states out of checkpoints.", origin="Meg")
    no_load_optim: bool = key(False, "Do not load the optimizer state.", origin="Meg")
    no_load_rng: bool = key(False, "Do not load RNG states.", origin="Meg")
    finetune: bool = key(
        False, "Load weights only and start at iteration 0 (no optimizer, RNG or scheduler "
        "state).", origin="Meg")
    checkpoint_validation_with_forward_pass: bool = key(
        False, "After saving, reload and check that a forward pass gives the same logits.")
    s3_path: str | None = key(
        None, "s3://bucket/prefix: after each save, rank 0 uploads every file of the checkpoint "
        "to s3_path/<basename of save>/global_stepN/ (boto3, multipart; credentials and "
        "AWS_ENDPOINT_URL from the environment). The save directory must be visible to rank 0 "
        "(a shared file system with several nodes).")
    s3_chunk_size: int = key(
        104_857_600, "Bytes per part of the multipart upload to s3_path (100 MiB; S3 needs at "
        "least 5 MiB).")


@dataclass(frozen=True)
class PrecisionArgs:
    precision: Literal["fp32", "fp16", "bfloat16", "bf16"] | None = key(
        None, "Training precision. Unset: taken from the fp16/bf16 blocks (fp32 if neither is "
        "enabled). Resolved to fp32, fp16 or bfloat16.")
    fp16: dict | None = key(None, "DeepSpeed fp16 block {enabled, loss_scale (0 = dynamic), "
                            "loss_scale_window, hysteresis, min_loss_scale, initial_scale_power}.",
                            origin="DSC")
    bf16: dict | None = key(None, "DeepSpeed bf16 block {enabled}.", origin="DSC")
    dynamic_loss_scale: bool | None = key(
        None, "fp16 loss scaling: true is dynamic (fp16.loss_scale 0), false is static "
        "(needs loss_scale); unset: dynamic unless loss_scale is set. Resolved to what the "
        "fp16 block finally says.", origin="Meg")
    loss_scale: float | None = key(
        None, "Static fp16 loss scale, written to fp16.loss_scale (0 or unset: dynamic). The "
        "fp16 block's own value wins when both are given.", origin="Meg")
    loss_scale_window: float = key(
        1000.0, "Dynamic loss scaling: steps without overflow before the scale rises "
        "(fp16.loss_scale_window; the block's value wins).", origin="Meg")
    hysteresis: int = key(
        2, "Dynamic loss scaling: overflows tolerated before the scale drops "
        "(fp16.hysteresis; the block's value wins).", origin="Meg")
    min_scale: float = key(
        1.0, "Dynamic loss scaling: the lowest scale (fp16.min_loss_scale; the block's value "
        "wins).", origin="Meg")
    amp: dict | None = key(None, "DeepSpeed apex AMP block.", origin="DSC",
                           unsupported="apex AMP is not supported; use the fp16 or bf16 block")
    fp32_allreduce: bool = key(False, "All-reduce gradients in fp32.", origin="Meg")
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = key(
        None, "Data type of gradient communication.", origin="DSC")
    data_types: dict | None = key(None, "DeepSpeed data_types block (e.g. grad_accum_dtype).",
                                  origin="DSC")
    torch_compile: bool = key(
        False, "Compile each transformer layer with torch.compile (inductor): the same losses as "
        "eager up to the reordering of floating-point sums; the first steps include the compile "
        "time. Not with pipe_parallel_size >= 1 or ZeRO stage 3.", origin="Here")
    torch_compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = key(
        "default", "torch.compile mode for torch_compile / fp8_training.", origin="Here")
    fp8_training: bool = key(
        False, "FP8 matmuls in the transformer layers' linear layers through torchao's float8 "
        "training (dynamic scaling; weights, optimizer and other ops stay bf16/fp32). Needs "
        "bf16, a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper) and torchao; "
        "compiles the layers (torch_compile) as torchao requires.", origin="Here")
    fp8_recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = key(
        "tensorwise", "torchao float8 recipe: tensorwise (one scale per tensor, e4m3), rowwise "
        "(one scale per row), rowwise_with_gw_hp (rowwise, weight gradient in bf16).",
        origin="Here")
    te_columnparallel: bool = key(
        False, "Transformer Engine column-parallel linear layers.", unsupported=_NO_TE)
    te_rowparallel: bool = key(
        False, "Transformer Engine row-parallel linear layers.", unsupported=_NO_TE)
    te_layernorm_mlp: bool = key(
        False, "Transformer Engine fused LayerNorm+MLP.", unsupported=_NO_TE)
    te_mha: bool = key(False, "Transformer Engine multi-head attention.", unsupported=_NO_TE)
    te_fp8_mha: bool = key(
        False, "Transformer Engine FP8 multi-head attention.", unsupported=_NO_TE_FP8)
    te_fp8_format: Literal["e4m3", "hybrid"] = key(
        "hybrid", "Transformer Engine FP8 format.", unsupported=_NO_TE_FP8)
    te_fp8_wgrad: bool = key(
        True, "Transformer Engine: weight gradients in FP8.", unsupported=_NO_TE_FP8)
    te_fp8_amax_history_len: int = key(
        1, "Transformer Engine delayed scaling: amax history length.", unsupported=_NO_TE_FP8)
    te_fp8_amax_compute_algo: str = key(
        "most_recent", "Transformer Engine delayed scaling: amax algorithm.",
        unsupported=_NO_TE_FP8)
    te_fp8_margin: int = key(
        0, "Transformer Engine delayed scaling: scaling-factor margin.", unsupported=_NO_TE_FP8)
