"""Every config key is implemented (and exercised by a test), refused with a reason, or a
declared speed hint noted in the run log: a key cannot be added without one of the three."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from cfg_helpers import make_cfg

from megatron.neox_arguments import ConfigError
from megatron.neox_arguments.fields import choices_of
from megatron.neox_arguments.schema import ALIASES, KEYS, KeySpec
from megatron.training.metrics_setup import build_metrics

TESTS = Path(__file__).resolve().parents[1]
# files that list every key without exercising any: this one and the generated-reference test
NOT_EXERCISING = {Path(__file__).resolve(), TESTS / "config" / "test_config_reference.py"}

REFUSED = sorted(k for k, s in KEYS.items() if s.status == "refused")
HINTS = sorted(k for k, s in KEYS.items() if s.status == "hint")


def test_every_key_has_exactly_one_status() -> None:
    bad = []
    for name, spec in KEYS.items():
        if spec.status not in ("implemented", "refused", "hint"):
            bad.append(f"{name}: status {spec.status!r}")
        if spec.unsupported and spec.hint:
            bad.append(f"{name}: both refused and a hint")
        if spec.derived and spec.status != "implemented":
            bad.append(f"{name}: derived keys are computed, so implemented")
        for reason in (spec.unsupported, spec.hint):
            if reason is not None and (not reason.strip() or "\n" in reason):
                bad.append(f"{name}: the reason must be one non-empty line")
    assert not bad, "\n".join(bad)
    assert REFUSED and HINTS  # both kinds exist, so the parametrized tests below check something


def _names_in_tests() -> set[str]:
    """Every identifier of the test sources; ``hidden-size`` counts as ``hidden_size``."""
    names: set[str] = set()
    for path in sorted(TESTS.rglob("*.py")):
        if path.resolve() in NOT_EXERCISING:
            continue
        text = path.read_text()
        names.update(re.findall(r"\w+", text))
        names.update(w.strip("-").replace("-", "_") for w in re.findall(r"\w[\w-]*", text))
    return names


def test_every_implemented_key_is_named_in_a_test() -> None:
    names = _names_in_tests()
    missing = [f"{name} ({spec.section})" for name, spec in KEYS.items()
               if spec.status == "implemented" and name not in names]
    print(f"{len(missing)} implemented keys named in no test:\n  " + "\n  ".join(missing))
    assert not missing, (
        f"{len(missing)} implemented keys are named in no test under tests/ (exercise each, "
        "or declare it refused or a hint): " + ", ".join(missing))


def _other_value(spec: KeySpec) -> Any:
    """A valid value of the key's type that differs from its default."""
    choices = choices_of(spec.type)
    if choices is not None:
        return next(c for c in choices if c != spec.default)
    args = typing.get_args(spec.type) if typing.get_origin(spec.type) in (
        typing.Union, types.UnionType) else (spec.type,)
    kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
    kind = kinds[0]
    if kind is bool:
        return not spec.default
    if kind is int:
        return (spec.default or 0) + 3
    if kind is float:
        return (spec.default or 0.0) + 0.5
    if kind is str:
        return "some-value"
    if kind is dict:
        return {"enabled": True}
    if kind is list:
        return ["some-value"]
    raise AssertionError(f"{spec.name}: no test value for {spec.type!r}")


@pytest.mark.parametrize("name", REFUSED)
def test_refused_key_names_itself_and_the_reason(name: str) -> None:
    spec = KEYS[name]
    value = _other_value(spec)
    with pytest.raises(ConfigError) as info:
        make_cfg(**{name: value})
    message = str(info.value)
    assert "\n" not in message
    assert f"a.yml: {name}:" in message and spec.unsupported in message
    make_cfg(**{name: spec.default})  # the default itself is accepted


def _run_log(tmp_path: Path, rank: int, **values: Any) -> str:
    cfg = make_cfg(log_dir=str(tmp_path / "logs"), **values).with_vocab_size(100)
    rt = types.SimpleNamespace(cfg=cfg, rank=rank)
    build_metrics(rt).close()
    log = tmp_path / "logs" / "run.log"
    return log.read_text() if log.exists() else ""


@pytest.mark.parametrize("name", HINTS)
def test_hint_key_is_noted_once_in_the_run_log(name: str, tmp_path: Path) -> None:
    spec = KEYS[name]
    value = _other_value(spec)
    text = _run_log(tmp_path, 0, **{name: value})
    notes = [line for line in text.splitlines() if f"note: {name} " in line]
    assert len(notes) == 1, text
    assert "speed hint with no effect here" in notes[0] and spec.hint in notes[0]


def test_hint_notes_only_for_set_keys_and_only_on_rank_0(tmp_path: Path) -> None:
    first, second = HINTS[0], HINTS[-1]
    text = _run_log(tmp_path / "defaults", 0)
    assert "run started" in text and "speed hint" not in text
    text = _run_log(tmp_path / "two", 0, **{first: _other_value(KEYS[first]),
                                           second: _other_value(KEYS[second])})
    assert [line.split()[1] for line in text.splitlines() if "speed hint" in line] == \
        sorted({first, second}, key=list(KEYS).index)
    assert "speed hint" not in _run_log(tmp_path / "rank1", 1, **{first: True})


def test_aliases_point_at_implemented_keys() -> None:
    for alias, target in ALIASES.items():
        assert alias in KEYS and KEYS[target].status == "implemented", alias
