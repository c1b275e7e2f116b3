"""Declaring config keys and checking values against their declared types.

Every key of the schema is a dataclass field made with :func:`key`; its type comes from the
annotation, and its default, doc line, choices and origin live in the field's metadata.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

ORIGINS = {
    "Meg": "Megatron-LM argument",
    "NeoX": "GPT-NeoX addition",
    "DSC": "DeepSpeed config",
    "DSL": "DeepSpeed launcher",
    "Here": "this framework",
}


class ConfigError(ValueError):
    """A config problem, reported as one line naming the file and key."""


def key(
    default: Any,
    doc: str,
    *,
    origin: str = "NeoX",
    derived: bool = False,
    unsupported: str | None = None,
    hint: str | None = None,
) -> Any:
    """Declare a config key.

    ``derived`` keys are computed during resolution and may not be set by users.
    ``unsupported`` keys are recognised (so existing configs load) but any value other than
    the default is refused with that message.
    ``hint`` keys are pure speed hints (a kernel fusion flag) that this implementation has no
    use for: they are accepted, and the message says why they change nothing.
    A key with neither is implemented: it has the effect GPT-NeoX documents.
    """
    meta = {"doc": doc, "origin": origin, "derived": derived, "unsupported": unsupported,
            "hint": hint}
    if isinstance(default, (dict, list)):
        snapshot = default

        return dataclasses.field(
            default_factory=lambda: _copy(snapshot), metadata=meta
        )
    return dataclasses.field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def type_name(tp: Any) -> str:
    """A short readable name for an annotation (used in errors and the docs)."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        args = get_args(tp)
        inner = ", ".join(type_name(a) for a in args) if args else ""
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def choices_of(tp: Any) -> list[Any] | None:
    """The allowed literal values of an annotation, if it is (an optional) Literal."""
    origin = get_origin(tp)
    if origin is Literal:
        return list(get_args(tp))
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            found = choices_of(arg)
            if found is not None:
                return found
    return None


_NOT = object()


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp``, or raise ``TypeError`` with a short reason.

    Accepts what YAML files written for GPT-NeoX contain: ints where floats are expected,
    numbers written as strings (``"1e-5"``, which YAML reads as text), case-insensitive
    choices.
    """
    result = _coerce(value, tp)
    if result is _NOT:
        choices = choices_of(tp)
        if choices is not None:
            raise TypeError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        raise TypeError(f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")
    return result


def _coerce(value: Any, tp: Any) -> Any:
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            return None if type(None) in args else _NOT
        # try exact-looking types first so "1" for int | str stays a str only when needed
        for arg in args:
            if arg is type(None):
                continue
            result = _coerce(value, arg)
            if result is not _NOT:
                return result
        return _NOT
    if origin is Literal:
        for choice in get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and isinstance(choice, str) and value.lower() == choice.lower():
                return choice
        return _NOT
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return _NOT
    if tp is int:
        if isinstance(value, bool):
            return _NOT
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return _NOT
            return int(number) if number.is_integer() else _NOT
        return _NOT
    if tp is float:
        if isinstance(value, bool):
            return _NOT
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NOT
        return _NOT
    if tp is str:
        return value if isinstance(value, str) else _NOT
    if origin is list or tp is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected: --eval_tasks lambada
        if not isinstance(value, (list, tuple)):
            return _NOT
        args = get_args(tp)
        if not args:
            return list(value)
        out = []
        for item in value:
            converted = _coerce(item, args[0])
            if converted is _NOT:
                return _NOT
            out.append(converted)
        return out
    if origin is dict or tp is dict:
        return dict(value) if isinstance(value, dict) else _NOT
    raise TypeError(f"unsupported annotation {tp!r}")  # a schema bug, not a user error


def resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)
