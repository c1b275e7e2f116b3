"""torch.compile and FP8 training of the model, applied in one place before DeepSpeed wraps it.

``torch_compile`` compiles every transformer layer on its own (``nn.Module.compile``): the
layers share their code, so the compile cost is about one layer's whatever the depth, the
parameters and state-dict keys stay as they are (checkpoints are unchanged), and activation
checkpointing keeps working because the checkpointed function calls the compiled layers. The
embedding, the final norm, the logits and the loss stay eager.

``fp8_training`` routes the matmuls of the transformer layers' linear layers through
torchao's float8 training (dynamically scaled FP8 inputs, weights and output gradients;
``torch._scaled_mm`` on FP8 tensor cores) and compiles the layers, which torchao needs for
speed. The output layer (logits) and linear layers whose dimensions are not multiples of 16
(FP8 GEMM alignment) stay in bf16. Weights, gradients and optimizer state keep their dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from megatron import accelerator
from megatron.neox_arguments import ConfigError, NeoXConfig
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear

FP8_ALIGNMENT = 16  # FP8 GEMMs need both matrix dimensions divisible by 16


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers (``GPTModel.layers``)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError("torch_compile / fp8_training: this model has no transformer layer "
                          "list to compile (pipe_parallel_size must be 0)")
    return list(layers)


def compile_layers(model: nn.Module, mode: str = "default") -> int:
    """Compile each transformer layer in place; returns how many were compiled."""
    layers = transformer_layers(model)
    for layer in layers:
        layer.compile(mode=None if mode == "default" else mode)
    return len(layers)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# ---------------------------------------------------------------------------------- FP8
def float8_config(recipe: str, *, emulate: bool = False) -> Any:
    """torchao's ``Float8LinearConfig`` for a recipe name; ``emulate`` computes the FP8
    product in higher precision (for tests on CPU; no speed-up)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if emulate else config


def _inductor_fp8_workaround() -> None:
    """torchao's own conversion entry point patches an inductor code-generation path that
    miscompiles FP8 stores; this conversion does not go through that entry point, so it
    applies the same patch (where the installed torchao has it)."""
    try:
        from torchao.float8._inductor_patch import _patch_inductor_min_max_codegen
    except ImportError:
        return
    _patch_inductor_min_max_codegen()


class Float8Matmul:
    """``linear_impl`` of a parallel linear layer whose product runs in FP8 (torchao).

    The same autograd function torchao's ``Float8Linear`` uses: the input and the weight are
    scaled and cast to float8 in forward, the output gradient in backward; the bias is added
    in the input's precision."""

    def __init__(self, recipe: str, *, emulate: bool = False):
        from torchao.float8.float8_linear import Float8Linear

        _inductor_fp8_workaround()
        self.recipe = recipe
        self.config = float8_config(recipe, emulate=emulate)
        # the GEMM settings torchao derives from the config, taken from a shape-less template
        template = Float8Linear(FP8_ALIGNMENT, FP8_ALIGNMENT, bias=False, config=self.config,
                                device="meta")
        self.mm_config = template.linear_mm_config

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), self.mm_config, self.config)
        return out if bias is None else out + bias.to(out.dtype)

    def __repr__(self) -> str:
        return f"Float8Matmul(recipe={self.recipe!r}, emulate={self.config.emulate})"


def _fp8_shaped(layer: nn.Module) -> bool:
    out_features, in_features = layer.weight.shape
    return out_features % FP8_ALIGNMENT == 0 and in_features % FP8_ALIGNMENT == 0


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise", *,
                      emulate: bool = False) -> list[str]:
    """Give the linear layers inside the transformer layers an FP8 product; returns the names
    of the converted layers (relative to ``model``)."""
    matmul = Float8Matmul(recipe, emulate=emulate)
    layers = transformer_layers(model)
    converted = []
    prefixes = {id(layer): f"layers.{i}" for i, layer in enumerate(layers)}
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) \
                    and _fp8_shaped(module):
                module.linear_impl = matmul
                converted.append(f"{prefixes[id(layer)]}.{name}")
    return converted


def require_fp8_device() -> None:
    """One-line ConfigError unless this rank's device has FP8 tensor cores and torchao is
    importable."""
    ok, what = accelerator.fp8_support()
    if not ok:
        low, high = accelerator.FP8_MIN_CAPABILITY
        raise ConfigError(f"fp8_training: {what} has no FP8 tensor cores (needs an NVIDIA GPU "
                          f"of compute capability {low}.{high} or newer: Ada, Hopper); unset "
                          "fp8_training")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise ConfigError("fp8_training: needs torchao (pip install -r "
                          "requirements/requirements-fp8.txt)") from None


def apply_compile_and_fp8(model: nn.Module, cfg: NeoXConfig) -> dict[str, Any]:
    """What ``torch_compile`` / ``fp8_training`` ask for, done to ``model`` in place (after it
    is on its device, before ``deepspeed.initialize``). Returns what was done, for the log."""
    p = cfg.precision
    done: dict[str, Any] = {"compiled_layers": 0, "fp8_layers": 0}
    if not (p.torch_compile or p.fp8_training):
        return done
    if p.fp8_training:
        require_fp8_device()
        done["fp8_layers"] = len(convert_to_float8(model, p.fp8_recipe))
        done["fp8_recipe"] = p.fp8_recipe
    done["compiled_layers"] = compile_layers(model, p.torch_compile_mode)
    return done
