"""Cross-key checks of the training side of a resolved config: post-training methods, the
DeepSpeed scheduler block, activation checkpointing, and the observability keys (profiler,
per-parameter logs, noise scale, forward-pass validation, curriculum). Called by
:func:`megatron.neox_arguments.checks.check_config`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.neox_arguments.config import NeoXConfig
    from megatron.neox_arguments.resolve import Locator


def post_training(cfg: NeoXConfig, loc: Locator, purpose: str | None) -> None:
    """train_impl against its data and the layouts it runs on (docs/post_training.md)."""
    pt, d = cfg.posttrain, cfg.data
    impl = pt.train_impl
    if impl in ("dpo", "rm", "orpo") and d.dataset_impl != "pairwise":
        raise loc.error("train_impl", "dataset_impl", message=(
            f"{impl} trains on chosen/rejected pairs: set dataset_impl: pairwise with "
            "pos_train_data_paths and neg_train_data_paths"))
    if impl != "normal" and cfg.parallelism.is_pipe_parallel:
        raise loc.error("train_impl", "pipe_parallel_size", message=(
            f"{impl} needs pipe_parallel_size: 0 (as in GPT-NeoX, which refuses a pipeline "
            "for dpo, kto and rm: the loss needs both sides' log-probabilities or rewards "
            "and the reference model on one rank)"))
    if pt.z_loss > 0 and cfg.parallelism.is_pipe_parallel:
        raise loc.error("z_loss", "pipe_parallel_size", message=(
            "is computed for the plain model only; use pipe_parallel_size: 0"))
    if impl == "rm" and cfg.parallelism.sequence_parallel:
        raise loc.error("train_impl", "sequence_parallel", message=(
            "rm reads the last hidden state of every sequence: turn sequence_parallel off"))
    if impl == "kto":
        rewards = pt.train_reward_data_paths
        if purpose == "train" and not rewards:
            raise loc.error("train_impl", "train_reward_data_paths", message=(
                "kto needs train_reward_data_paths (one value per document; > 0: desirable)"))
    for split in ("train", "valid", "test"):
        rewards = getattr(pt, f"{split}_reward_data_paths")
        paths = getattr(d, f"{split}_data_paths")
        if rewards is not None and (paths is None or len(rewards) != len(paths)):
            raise loc.error(f"{split}_reward_data_paths", message=(
                f"has {len(rewards)} entries for {len(paths or [])} {split}_data_paths"))
    unpacked = d.pack_impl == "unpacked" or impl == "kto"
    if unpacked and d.dataset_impl != "pairwise" and d.data_path:
        raise loc.error("pack_impl" if impl != "kto" else "train_impl", "data_path", message=(
            "one document per sample reads train_data_paths (with train_label_data_paths), "
            "not data_path with split"))
    if pt.lora_rank < 0:
        raise loc.error("lora_rank", message=f"must be >= 0, got {pt.lora_rank}")
    if pt.lora_rank > 0:
        if cfg.precision.fp8_training:
            raise loc.error("lora_rank", "fp8_training", message=(
                "LoRA adapters and fp8_training both replace the linear layers' product; "
                "use one of them"))
        from megatron.training.lora import TARGETS

        bad = [t for t in pt.lora_target_modules if t not in TARGETS]
        if bad or not pt.lora_target_modules:
            raise loc.error("lora_target_modules", message=(
                f"{bad or '[]'}: choose among {', '.join(TARGETS)}"))
    if d.dataset_impl != "pairwise":
        return
    for split in ("train", "valid", "test"):
        pos = getattr(pt, f"pos_{split}_data_paths") or []
        for other in (f"neg_{split}_data_paths", f"pos_{split}_label_data_paths",
                      f"neg_{split}_label_data_paths"):
            value = getattr(pt, other)
            if (value is not None or other.startswith("neg_") and not other.endswith(
                    "label_data_paths")) and len(value or []) != len(pos):
                raise loc.error(other, message=(
                    f"has {len(value or [])} entries for {len(pos)} pos_{split}_data_paths"))
    if purpose == "train" and not pt.pos_train_data_paths:
        raise loc.error("dataset_impl", "pos_train_data_paths", message=(
            "pairwise training needs pos_train_data_paths and neg_train_data_paths"))


def scheduler(cfg: NeoXConfig, loc: Locator) -> None:
    # As in GPT-NeoX, DeepSpeed builds the LR schedule from this block only for 1-bit Adam;
    # every other optimizer gets the schedule of the lr_* keys, so the block would be ignored.
    if cfg.ds.scheduler is not None and cfg.optim.optimizer_type != "OneBitAdam":
        raise loc.error("scheduler", message=(
            f"the DeepSpeed scheduler block is used only with optimizer type OneBitAdam, not "
            f"{cfg.optim.optimizer_type}; the LR schedule comes from lr_decay_style, warmup, "
            "lr_decay_iters and min_lr: remove the block"))


def act_ckpt(cfg: NeoXConfig, loc: Locator) -> None:
    a = cfg.act_ckpt
    if a.deepspeed_activation_checkpointing and a.contiguous_checkpointing \
            and not a.partition_activations:
        raise loc.error("contiguous_checkpointing", "partition_activations", message=(
            "contiguous_checkpointing needs partition_activations: DeepSpeed keeps only "
            "partitioned checkpoints in contiguous buffers"))


#: The keys that configure DeepSpeed's activation checkpointing.
DEEPSPEED_CHECKPOINT_KEYS = ("partition_activations", "checkpoint_in_cpu",
                             "contiguous_checkpointing", "synchronize_each_layer",
                             "profile_backward")


def act_ckpt_warnings(cfg: NeoXConfig, gpu: bool) -> list[str]:
    """Activation-checkpointing keys that are set but change nothing in this run."""
    a = cfg.act_ckpt
    set_keys = [k for k in DEEPSPEED_CHECKPOINT_KEYS if getattr(a, k)]
    if not set_keys:
        return []
    keys = ", ".join(set_keys)
    if not a.checkpoint_activations:
        return [f"{keys}: no effect without checkpoint_activations (nothing is checkpointed)"]
    if not a.deepspeed_activation_checkpointing:
        return [f"{keys}: no effect with deepspeed_activation_checkpointing: false "
                "(DeepSpeed's checkpointing runs unconfigured, as in GPT-NeoX)"]
    out = []
    if a.partition_activations and cfg.parallelism.sequence_parallel \
            and cfg.parallelism.model_parallel_size > 1:
        out.append("partition_activations: the checkpointed activations are already split "
                   "over the tensor-parallel ranks by sequence_parallel; not split again"
                   + (" (so contiguous_checkpointing has nothing to hold either)"
                      if a.contiguous_checkpointing else ""))
    elif a.checkpoint_in_cpu and not a.partition_activations and not gpu:
        out.append("checkpoint_in_cpu: on CPU ranks the checkpoints are in host memory "
                   "already; nothing is moved")
    return out


def observability(cfg: NeoXConfig, loc: Locator) -> None:
    """Profiler, per-parameter logs, noise scale, forward-pass validation, curriculum."""
    lg = cfg.logging
    if (lg.profile or lg.memory_profiling) and lg.profile_step_stop <= lg.profile_step_start:
        raise loc.error("profile_step_stop", "profile_step_start", message=(
            f"{lg.profile_step_stop} must be greater than profile_step_start "
            f"{lg.profile_step_start}"))
    if lg.profile and not (lg.tensorboard_dir or lg.log_dir):
        raise loc.error("profile", message="needs tensorboard_dir (or log_dir) for the trace")
    if lg.memory_profiling and not lg.memory_profiling_path:
        raise loc.error("memory_profiling", message="needs memory_profiling_path for the "
                        "snapshot")
    if lg.log_gradient_noise_scale and lg.gradient_noise_scale_n_batches < 2:
        raise loc.error("gradient_noise_scale_n_batches", message=(
            f"{lg.gradient_noise_scale_n_batches} must be at least 2"))
    if cfg.checkpoint.checkpoint_validation_with_forward_pass and \
            cfg.parallelism.is_pipe_parallel:
        raise loc.error("checkpoint_validation_with_forward_pass", "pipe_parallel_size", message=(
            f"is implemented for the plain model only (pipe_parallel_size "
            f"{cfg.parallelism.pipe_parallel_size}); use pipe_parallel_size: 0"))
    block = cfg.ds.curriculum_learning
    if block and block.get("enabled", True) is not False:
        from megatron.training.curriculum import scheduler

        try:
            scheduler(block)
        except ValueError as exc:
            raise loc.error("curriculum_learning", message=str(exc)) from None
        top = block.get("max_difficulty")
        if isinstance(top, int) and cfg.model.seq_length and top > cfg.model.seq_length:
            raise loc.error("curriculum_learning", "seq_length", message=(
                f"max_difficulty {top} is longer than seq_length {cfg.model.seq_length}"))
