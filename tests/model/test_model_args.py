"""The model's config section and its tables (``megatron/model/args.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron.model.args import (
    ATTENTION_TYPES,
    GATED_ACTIVATIONS,
    SPARSE_ATTENTION_TYPES,
    ModelArgs,
    attention_layer_types,
    mlp_projection_widths,
    mlp_width,
    moe_expert_width,
)
from megatron.neox_arguments import SECTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_the_config_schema_uses_the_models_section() -> None:
    assert SECTIONS["model"][0] is ModelArgs


def test_attention_config_expands_to_one_type_per_layer() -> None:
    assert attention_layer_types(None, 3) == ["global"] * 3
    config = [[["local", "global"], 3], [["flash"], 1]]
    assert attention_layer_types(config, 4) == ["local", "global", "local", "flash"]
    assert attention_layer_types([["global", "all"]], 2) == ["global", "global"]
    with pytest.raises(ValueError, match="describes 3 layers but num_layers is 4"):
        attention_layer_types([[["global"], 3]], 4)
    assert not set(ATTENTION_TYPES) & set(SPARSE_ATTENTION_TYPES)


def test_mlp_width_rule() -> None:
    assert mlp_width(ModelArgs(hidden_size=48), "gelu") == 192
    # GPT-NeoX: gated MLPs take 2/3 of the base width (4 x hidden) for both halves together
    assert mlp_width(ModelArgs(hidden_size=48), "swiglu") == 64
    assert mlp_projection_widths(ModelArgs(hidden_size=48), "swiglu") == (128, 64)
    # Llama-2-7B as GPT-NeoX ships it
    llama2 = ModelArgs(hidden_size=4096, intermediate_size=32768, mlp_multiple_of=256)
    assert mlp_projection_widths(llama2, "swiglu") == (22016, 11008)
    assert mlp_width(llama2, "gelu") == 32768
    # expansion_factor sets the base width; intermediate_size wins over it
    assert mlp_width(ModelArgs(hidden_size=48, expansion_factor=3), "gelu") == 144
    assert mlp_width(ModelArgs(hidden_size=48, expansion_factor=3), "swiglu") == 48
    assert mlp_width(ModelArgs(hidden_size=48, expansion_factor=3, intermediate_size=60),
                     "gelu") == 60
    # first projection to a multiple of 2 x mlp_multiple_of, second to mlp_multiple_of
    assert mlp_projection_widths(ModelArgs(hidden_size=48, mlp_multiple_of=100),
                                 "swiglu") == (200, 100)
    assert mlp_projection_widths(ModelArgs(hidden_size=48, mlp_multiple_of=64),
                                 "gelu") == (256, 192)
    assert mlp_width(ModelArgs(hidden_size=48, mlp_multiple_of=64), "gelu") == 192
    # 3 x the width always gives back the width (what the Hugging Face import writes)
    for width in (7, 176, 11008, 14336):
        assert mlp_projection_widths(ModelArgs(hidden_size=8, intermediate_size=3 * width),
                                     "swiglu") == (2 * width, width)
    # the legacy mlp_type: llama switch: intermediate_size per half, else 8/3 x hidden rounded
    # up to a multiple of 256 whatever mlp_multiple_of says (GPT-NeoX's LLaMAParallelMLP)
    legacy = {"hidden_size": 48, "mlp_type": "llama", "activation": "swiglu"}
    assert mlp_width(ModelArgs(**legacy), "swiglu") == 256
    assert mlp_width(ModelArgs(**legacy, mlp_multiple_of=100), "swiglu") == 256
    assert mlp_width(ModelArgs(**legacy, intermediate_size=7), "swiglu") == 7
    assert mlp_width(ModelArgs(**{**legacy, "hidden_size": 4096}), "swiglu") == 11008
    assert mlp_width(ModelArgs(**{**legacy, "hidden_size": 200}), "swiglu") == 768
    # the experts: 8/3 x hidden rounded up to mlp_multiple_of
    assert moe_expert_width(ModelArgs(hidden_size=48, intermediate_size=7,
                                      activation="swiglu")) == 7
    assert moe_expert_width(ModelArgs(hidden_size=48, activation="swiglu")) == 128
    assert moe_expert_width(ModelArgs(hidden_size=48)) == 192
    assert "swiglu" in GATED_ACTIVATIONS and "gelu" not in GATED_ACTIVATIONS


def test_llama2_7b_config_has_the_parameters_of_the_real_model() -> None:
    from megatron.model_size import parameter_count
    from tests.model.gpt_model_helpers import load_tiny

    cfg = load_tiny("llama2/7B")
    assert mlp_width(cfg.model, cfg.model.activation) == 11008
    assert parameter_count(cfg.model, 32000) == 6_738_415_616  # Llama-2-7b-hf


@pytest.mark.parametrize("first", ["megatron.model.args", "megatron.model",
                                   "megatron.neox_arguments.fields", "megatron.model.gpt"])
def test_model_and_config_packages_import_in_any_order(first: str) -> None:
    """``megatron.model.args`` loads without the model code or DeepSpeed, and neither package
    needs the other to be imported first."""
    code = (
        f"import sys, {first}\n"
        "light = 'deepspeed' not in sys.modules and 'megatron.model.gpt' not in sys.modules\n"
        "from megatron.neox_arguments import NeoXConfig\n"
        "from megatron.model import GPTModel, build_model\n"
        "print(light)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(first != "megatron.model.gpt")


def test_scalenorm_epsilon_bounds_the_norm() -> None:
    import torch

    from megatron.model.norms import build_norm

    x = torch.tensor([[3e-4, 4e-4], [3.0, 4.0]])  # norms 5e-4 and 5
    for eps, small in ((1e-8, [0.6, 0.8]), (1e-2, [0.03, 0.04])):
        norm = build_norm(ModelArgs(hidden_size=2, norm="scalenorm", scalenorm_epsilon=eps), 2)
        out = norm(x)
        assert torch.allclose(out[0], torch.tensor(small), atol=1e-6)  # x / max(|x|, eps)
        assert torch.allclose(out[1], torch.tensor([0.6, 0.8]))
