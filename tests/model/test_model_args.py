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
    mlp_width,
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
    # gated: 8/3 x hidden rounded up to mlp_multiple_of, per half
    assert mlp_width(ModelArgs(hidden_size=48), "swiglu") == 128
    assert mlp_width(ModelArgs(hidden_size=48, mlp_multiple_of=100), "swiglu") == 200
    assert mlp_width(ModelArgs(hidden_size=48, intermediate_size=7), "swiglu") == 7
    assert "swiglu" in GATED_ACTIVATIONS and "gelu" not in GATED_ACTIVATIONS


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
