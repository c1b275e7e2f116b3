"""Config section for post-training: the training method, its coefficients and its data
(GPT-NeoX's keys), and LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.neox_arguments.fields import key

TRAIN_IMPLS = ("normal", "dpo", "kto", "rm", "orpo")


@dataclass(frozen=True)
class PostTrainArgs:
    train_impl: Literal["normal", "dpo", "kto", "rm", "orpo"] = key(
        "normal", "Training method: normal (language modelling; SFT with label datasets), dpo "
        "(pairwise data), kto (unpaired data with *_reward_data_paths), rm (a scalar reward "
        "head on pairwise data), orpo (pairwise data). See docs/post_training.md.")
    dpo_beta: float = key(0.1, "DPO: the strength of the implicit KL penalty (beta).")
    dpo_fp32: bool = key(True, "DPO: log-probabilities in fp32.")
    dpo_reference_free: bool = key(
        False, "DPO without a reference model (its log-probabilities taken as 0).")
    kto_beta: float = key(0.1, "KTO: beta.")
    kto_fp32: bool = key(True, "KTO: log-probabilities in fp32.")
    kto_desirable_weight: float = key(1.0, "KTO: weight of the desirable examples' loss.")
    kto_undesirable_weight: float = key(1.0, "KTO: weight of the undesirable examples' loss.")
    orpo_lambda: float = key(0.1, "ORPO: weight of the odds-ratio term (lambda).",
                             origin="Here")
    rm_pooling: Literal["last", "mean"] = key(
        "last", "RM: the reward of a sequence is the head's value at its last trained "
        "position, the one predicting its last labelled token (last: GPT-NeoX's reward), or, "
        "an addition of this trainer, the mean of its values over the trained positions "
        "(mean).", origin="Here")
    z_loss: float = key(0.0, "Weight of the z-loss, mean(logsumexp(logits)^2) over the "
                        "trained tokens, added to the loss (0: off); for rm, as GPT-NeoX, "
                        "mean(r_chosen^2 + r_rejected^2) of the rewards.")
    precompute_model_name: str | None = key(
        None, "DPO/KTO: read the reference log-probabilities from datasets "
        "'<data path>_<name>_ref' (one value per document) instead of running a frozen copy "
        "of the starting model.")
    pos_train_data_paths: list[str] | None = key(None, "Pairwise: chosen training sequences.")
    neg_train_data_paths: list[str] | None = key(None, "Pairwise: rejected training sequences.")
    pos_valid_data_paths: list[str] | None = key(None, "Pairwise: chosen validation sequences.")
    neg_valid_data_paths: list[str] | None = key(None, "Pairwise: rejected validation "
                                                 "sequences.")
    pos_test_data_paths: list[str] | None = key(None, "Pairwise: chosen test sequences.")
    neg_test_data_paths: list[str] | None = key(None, "Pairwise: rejected test sequences.")
    pos_train_label_data_paths: list[str] | None = key(None, "Labels of pos_train_data_paths.")
    neg_train_label_data_paths: list[str] | None = key(None, "Labels of neg_train_data_paths.")
    pos_valid_label_data_paths: list[str] | None = key(None, "Labels of pos_valid_data_paths.")
    neg_valid_label_data_paths: list[str] | None = key(None, "Labels of neg_valid_data_paths.")
    pos_test_label_data_paths: list[str] | None = key(None, "Labels of pos_test_data_paths.")
    neg_test_label_data_paths: list[str] | None = key(None, "Labels of neg_test_data_paths.")
    train_reward_data_paths: list[str] | None = key(
        None, "KTO: one value per document of train_data_paths (> 0: desirable).")
    valid_reward_data_paths: list[str] | None = key(None, "KTO: rewards of valid_data_paths.")
    test_reward_data_paths: list[str] | None = key(None, "KTO: rewards of test_data_paths.")
    lora_rank: int = key(
        0, "LoRA: the adapters' rank r (0: no LoRA). Only the adapters train; the base weights "
        "are frozen. See docs/post_training.md.", origin="Here")
    lora_alpha: float = key(16.0, "LoRA: the adapters are scaled by lora_alpha / lora_rank.",
                            origin="Here")
    lora_dropout: float = key(0.0, "LoRA: dropout on the adapters' input.", origin="Here")
    lora_target_modules: list[str] = key(
        ["query_key_value", "dense"], "LoRA: the linear layers that get adapters, by name: "
        "query_key_value, dense (attention output), dense_h_to_4h, dense_4h_to_h.",
        origin="Here")
