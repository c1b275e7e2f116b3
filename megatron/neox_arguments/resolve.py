"""From merged user files to a validated, fully derived :class:`NeoXConfig`.

Resolution is a pure function of the merged files and a few facts about where the ranks run
(world size, whether they have GPUs). Every problem is raised as a one-line
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from megatron.neox_arguments import checks, checks_services, checks_training, shortcuts
from megatron.neox_arguments.config import NeoXConfig, padded_vocab_size
from megatron.neox_arguments.deepspeed_config import BF16_KEYS
from megatron.neox_arguments.fields import ConfigError, coerce, type_name
from megatron.neox_arguments.groups_training import OPTIMIZER_TYPES
from megatron.neox_arguments.loader import MergedConfig
from megatron.neox_arguments.schema import ALIASES, KEYS, SECTIONS, user_keys

PURPOSES = {"train.py": "train", "generate.py": "generate", "eval.py": "eval"}


@dataclass(frozen=True)
class RunFacts:
    """What resolution needs to know about the job besides the files."""

    world_size: int = 1
    gpu: bool = False
    launching: bool = True  # False for --dry-run: machine facts become warnings
    purpose: str | None = "train"  # train | generate | eval | None
    vocab_size: int | None = None
    user_script: str | None = None  # the script deepy.py launches (or the worker runs)


def purpose_of(user_script: str | None) -> str | None:
    if not user_script:
        return None
    name = user_script.replace("\\", "/").rsplit("/", 1)[-1]
    return PURPOSES.get(name)


class Locator:
    """Formats errors as ``file: key: message`` using where each key was set."""

    def __init__(self, merged: MergedConfig):
        self.merged = merged

    def where(self, *names: str) -> str:
        for name in names:
            if name in self.merged.sources:
                return f"{self.merged.sources[name]}: {name}"
        files = ", ".join(dict.fromkeys(self.merged.files)) or "<config>"
        return f"{files}: {names[0]}"

    def error(self, *names: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(*names)}: {message}")


def _typed_values(merged: MergedConfig, loc: Locator) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, raw in merged.values.items():
        spec = KEYS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, user_keys(), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise loc.error(name, message=f"unknown key{hint}")
        if spec.derived:
            raise loc.error(name, message="is derived from other keys and cannot be set")
        try:
            value = coerce(raw, spec.type)
        except TypeError as exc:
            raise loc.error(name, message=str(exc)) from None
        if spec.unsupported and value != spec.default:
            raise loc.error(name, message=spec.unsupported)
        values[name] = value
    for alias, target in ALIASES.items():
        if alias in values:
            if target in values and values[target] != values[alias]:
                raise loc.error(alias, message=f"conflicts with {target} "
                                f"({values[alias]!r} vs {values[target]!r}); set only one")
            values[target] = values[alias]
    return values


def _sections(values: dict[str, Any]) -> dict[str, Any]:
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, value in values.items():
        per_section[KEYS[name].section][name] = value
    return {name: cls(**per_section[name]) for name, (cls, _) in SECTIONS.items()}


def _resolve_precision(values: dict[str, Any], loc: Locator) -> str:
    fp16_on = bool((values.get("fp16") or {}).get("enabled", False))
    bf16_on = bool((values.get("bf16") or {}).get("enabled", False))
    if fp16_on and bf16_on:
        raise loc.error("bf16", "fp16", message="bf16.enabled and fp16.enabled are both true; "
                        "enable one precision")
    from_blocks = "fp16" if fp16_on else "bfloat16" if bf16_on else None
    asked = values.get("precision")
    if asked == "bf16":
        asked = "bfloat16"
    if asked is None:
        return from_blocks or "fp32"
    if from_blocks is not None and from_blocks != asked:
        block = "fp16" if fp16_on else "bf16"
        raise loc.error("precision", message=f"{asked} conflicts with {block}.enabled: true")
    return asked


def _resolve_optimizer(values: dict[str, Any], loc: Locator, purpose: str | None) -> tuple:
    block = values.get("optimizer")
    if block is None:
        if purpose == "train":
            raise loc.error("optimizer", message="required for training: "
                            "{type: Adam, params: {lr: ...}}")
        return "Adam", values.get("lr")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise loc.error("optimizer", message="needs a 'type' (one of "
                        f"{', '.join(OPTIMIZER_TYPES)})")
    canonical = {t.lower(): t for t in OPTIMIZER_TYPES}.get(kind.lower())
    if canonical is None:
        close = difflib.get_close_matches(kind, OPTIMIZER_TYPES, n=2, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise loc.error("optimizer", message=f"type {kind!r} is unknown{hint}; choose from "
                        f"{', '.join(OPTIMIZER_TYPES)}")
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise loc.error("optimizer", message="params must be a mapping")
    lr = values.get("lr")
    if lr is None and "lr" in params:
        try:
            lr = coerce(params["lr"], float)
        except TypeError as exc:
            raise loc.error("optimizer", message=f"params.lr: {exc}") from None
    if lr is None and purpose == "train":
        raise loc.error("optimizer", message="params.lr is missing (or set lr)")
    return canonical, lr


def _batch(values: dict[str, Any], dp: int, loc: Locator) -> tuple[int, int, int]:
    tbs = values.get("train_batch_size")
    mbs = values.get("train_micro_batch_size_per_gpu")
    gas = values.get("gradient_accumulation_steps")
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    for name, v in zip(names, (tbs, mbs, gas)):
        if v is not None and v < 1:
            raise loc.error(name, message=f"must be at least 1, got {v}")
    state = f"(train_batch_size={tbs}, train_micro_batch_size_per_gpu={mbs}, " \
            f"gradient_accumulation_steps={gas}, data-parallel size={dp})"
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * dp:
            raise loc.error(*names, message="train_batch_size must equal micro batch x gradient "
                            f"accumulation x data-parallel size {state}")
    elif tbs is not None and mbs is not None:
        if tbs % (mbs * dp):
            raise loc.error(*names, message="train_batch_size is not divisible by micro batch x "
                            f"data-parallel size {state}")
        gas = tbs // (mbs * dp)
    elif tbs is not None and gas is not None:
        if tbs % (gas * dp):
            raise loc.error(*names, message="train_batch_size is not divisible by gradient "
                            f"accumulation x data-parallel size {state}")
        mbs = tbs // (gas * dp)
    elif mbs is not None:
        gas = gas or 1
        tbs = mbs * gas * dp
    elif tbs is not None:
        if tbs % dp:
            raise loc.error(*names, message=f"train_batch_size is not divisible by the "
                            f"data-parallel size {state}")
        gas, mbs = 1, tbs // dp
    else:
        raise loc.error("train_micro_batch_size_per_gpu", message="set "
                        "train_micro_batch_size_per_gpu (and optionally train_batch_size or "
                        "gradient_accumulation_steps)")
    return tbs, mbs, gas


def resolve_config(merged: MergedConfig, facts: RunFacts | None = None) -> NeoXConfig:
    """Validate the merged files and derive every computed value."""
    facts = facts or RunFacts()
    loc = Locator(merged)
    values = _typed_values(merged, loc)
    warnings: list[str] = []

    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if values.get(name) is None:
            raise loc.error(name, message="required key is missing")
    if facts.purpose == "train" and values.get("train_iters") is None \
            and values.get("train_epochs") is None:
        raise loc.error("train_iters", message="required for training (or set train_epochs)")

    derived: dict[str, Any] = {}
    derived["precision"] = _resolve_precision(values, loc)
    extra_bf16 = sorted(set(values.get("bf16") or {}) - {"bf16", *BF16_KEYS})
    if extra_bf16:
        warnings.append(f"bf16: {', '.join(extra_bf16)} (loss scaling) have no meaning for "
                        "bf16 and are not passed to DeepSpeed")
    derived["optimizer_type"], derived["lr"] = _resolve_optimizer(values, loc, facts.purpose)
    derived.update(shortcuts.fold_zero_shortcuts(values, warnings))
    derived.update(shortcuts.fold_loss_scale_shortcuts(values, derived["precision"], loc,
                                                       warnings))

    mp = values.get("model_parallel_size", 1)
    pp = values.get("pipe_parallel_size", 0)
    if mp < 1:
        raise loc.error("model_parallel_size", message=f"must be at least 1, got {mp}")
    if pp < 0:
        raise loc.error("pipe_parallel_size", message=f"must be 0 or more, got {pp}")
    stages = max(pp, 1)
    if facts.world_size % (stages * mp):
        raise loc.error("pipe_parallel_size", "model_parallel_size", message=(
            f"the launch has {facts.world_size} ranks (hostfile / num_gpus), not a multiple of "
            f"pipeline stages x model_parallel_size = {stages} x {mp}"))
    dp = facts.world_size // (stages * mp)
    derived.update(world_size=facts.world_size, global_num_gpus=facts.world_size,
                   data_parallel_size=dp, is_pipe_parallel=pp >= 1)
    derived.update(user_script=facts.user_script, config_files=dict(merged.texts) or None)
    tbs, mbs, gas = _batch(values, dp, loc)
    derived.update(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs,
                   gradient_accumulation_steps=gas)

    activation = values.get("activation", "gelu")
    if values.get("geglu"):
        activation = "geglu"
    if values.get("mlp_type") == "llama":
        activation = "swiglu"
    derived["activation"] = activation
    if values.get("num_kv_heads") is None:
        derived["num_kv_heads"] = values["num_attention_heads"]
    if values.get("max_position_embeddings") is None:
        derived["max_position_embeddings"] = values["seq_length"]
    if values.get("apply_query_key_layer_scaling"):
        derived["attention_softmax_in_fp32"] = True
    if values.get("lr_decay_iters") is None and values.get("train_iters") is not None:
        fraction = values.get("lr_decay_fraction")
        iters = values["train_iters"]
        derived["lr_decay_iters"] = int(iters * fraction) if fraction is not None else iters
    if facts.vocab_size is not None:
        derived["padded_vocab_size"] = padded_vocab_size(
            facts.vocab_size, values.get("make_vocab_size_divisible_by", 128), mp)
    derived["distributed_backend"] = values.get("distributed_backend") or (
        "nccl" if facts.gpu else "gloo")

    sections = _sections({**values, **derived})
    cfg = NeoXConfig(**sections, merged=merged)
    checks.check_config(cfg, loc, facts.purpose)
    checks_services.check_services(cfg, loc)
    warnings += checks.mlp_warnings(cfg)
    warnings += checks_training.act_ckpt_warnings(cfg, facts.gpu)
    warnings += checks.check_machine(cfg, loc, facts)
    return dataclasses.replace(cfg, warnings=tuple(warnings))


def describe_key(name: str) -> str:
    spec = KEYS[name]
    return f"{name} ({type_name(spec.type)}, default {spec.default!r}): {spec.doc}"


def resolve_section(merged: MergedConfig, section: str) -> Any:
    """One section from the user's values alone (deepy.py needs the launcher options before
    the world size, and so the full resolution, is known)."""
    loc = Locator(merged)
    cls = SECTIONS[section][0]
    subset: dict[str, Any] = {}
    for name, raw in merged.values.items():
        spec = KEYS.get(name)
        if spec is None or spec.section != section or spec.derived:
            continue
        try:
            subset[name] = coerce(raw, spec.type)
        except TypeError as exc:
            raise loc.error(name, message=str(exc)) from None
    return cls(**subset)
