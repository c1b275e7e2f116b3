"""The generated config reference (configs/README.md) documents every key and is up to date."""

from __future__ import annotations

from pathlib import Path

from megatron.neox_arguments.docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_up_to_date():
    committed = (ROOT / "configs" / "README.md").read_text()
    assert committed == render(), "run: python -m megatron.neox_arguments.docs > configs/README.md"


def test_reference_documents_every_key():
    from megatron.neox_arguments import KEYS

    text = render()
    for name, spec in KEYS.items():
        assert f"| `{name}` |" in text
        assert spec.doc.strip(), name
