"""Reading YAML/JSON config files and merging them in order, remembering where each key came from."""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron.neox_arguments.fields import ConfigError
from megatron.neox_arguments.schema import canonical_name

CONFIG_SUFFIXES = (".yml", ".yaml", ".json")


class _NeoXLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading ``1e-5`` (no dot) as a float like YAML 1.2 does, and
    refusing a key set twice in one mapping to different values (YAML leaves that to the
    loader; PyYAML keeps the last one silently). A key repeated with the same value, as some
    published GPT-NeoX configs do, is accepted."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, tuple[int, Any]] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            value = self.construct_object(value_node, deep=True)
            if first is None:
                seen[key] = (line, value)
            elif first[1] != value:  # the same value twice says nothing new (GPT-NeoX's 20B)
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice in one mapping, to different values "
                    f"(lines {first[0]} and {line})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# A config is a few hundred values; these bound what a damaged or hostile file can make the
# loader do (YAML aliases can describe exponentially large documents in a few lines).
MAX_NESTING = 64
MAX_VALUES = 100_000


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_NeoXLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


@dataclass(frozen=True)
class Override:
    """A key that a later file set again."""

    key: str  # top-level key, or a dotted path inside a DeepSpeed block
    old_file: str
    new_file: str
    old: Any
    new: Any

    def describe(self) -> str:
        same = " (same value)" if self.old == self.new else ""
        return f"{self.key}: {self.old!r} ({self.old_file}) -> {self.new!r} ({self.new_file}){same}"


@dataclass(frozen=True)
class MergedConfig:
    """The user's config files merged in order (before defaults and validation)."""

    values: dict[str, Any]
    sources: dict[str, str]
    overrides: tuple[Override, ...] = ()
    files: tuple[str, ...] = ()
    texts: dict[str, str] = field(default_factory=dict)

    def source(self, key: str) -> str:
        return self.sources.get(key, "<defaults>")

    def with_values(self, extra: dict[str, Any], origin: str) -> MergedConfig:
        """A copy with ``extra`` merged on top (e.g. command-line overrides)."""
        values, sources, overrides = _merge_into(
            dict(self.values), dict(self.sources), list(self.overrides), extra, origin
        )
        return MergedConfig(values, sources, tuple(overrides), self.files, self.texts)

    # The config travels to the workers on their command line: compressed JSON in base64.
    def encode(self) -> str:
        payload = {
            "values": self.values,
            "sources": self.sources,
            "overrides": [o.__dict__ for o in self.overrides],
            "files": list(self.files),
        }
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode()

    @classmethod
    def decode(cls, blob: str) -> MergedConfig:
        try:
            payload = json.loads(zlib.decompress(base64.urlsafe_b64decode(blob.encode())))
        except (ValueError, zlib.error) as exc:
            raise ConfigError(f"--neox_config: not an encoded config ({exc})") from None
        return cls(
            values=payload["values"],
            sources=payload["sources"],
            overrides=tuple(Override(**o) for o in payload["overrides"]),
            files=tuple(payload["files"]),
        )

    def to_yaml(self) -> str:
        """The merged configuration as one YAML document (written into checkpoints)."""
        header = "".join(f"# merged from {f}\n" for f in self.files)
        return header + yaml.safe_dump(self.values, sort_keys=False, default_flow_style=False)


def find_config_file(name: str, conf_dir: str | None = None) -> Path:
    """Locate a config given on the command line; ``125M`` finds ``configs/125M.yml``."""
    base = Path(conf_dir) / name if conf_dir else Path(name)
    candidates = [base] + [Path(str(base) + suffix) for suffix in CONFIG_SUFFIXES]
    if not conf_dir and not base.is_absolute():
        candidates += [Path("configs") / name] + [
            Path("configs") / (name + suffix) for suffix in CONFIG_SUFFIXES
        ]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"{name}: config file not found (looked for {', '.join(map(str, candidates))})")


def _config_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if b"\x00" in raw:
        raise ConfigError(f"{path}: a binary file, not a YAML or JSON config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})"
                          ) from None


def _nesting_depth(text: str, is_json: bool) -> int:
    """The deepest nesting of mappings and lists, from the token stream (no recursion, so a
    deeply nested file cannot exhaust the stack before it is refused)."""
    depth = deepest = 0
    if is_json:
        in_string = escaped = False
        for ch in text:
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif ch in "]}":
                depth -= 1
        return deepest
    for event in yaml.parse(text, Loader=_NeoXLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                break
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def _count_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds with every alias expanded; stops past ``limit``. Shared
    sub-documents (YAML aliases) are counted once per use, from a table, in linear time."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("a YAML alias refers to itself")
        active.add(key)
        items = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for item in items:
            total += size(item)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(data)


def _json_mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out and out[key] != value:
            raise ConfigError(f"key {key!r} is set twice in one mapping, to different values")
        out[key] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """One file's keys, canonicalised (dashes become underscores)."""
    text = _config_text(path)
    is_json = path.suffix == ".json"
    try:
        if _nesting_depth(text, is_json) > MAX_NESTING:
            raise ConfigError(f"{path}: nested deeper than {MAX_NESTING} levels")
        if is_json:
            data = json.loads(text, object_pairs_hook=_json_mapping)
        else:
            data = yaml.load(text, Loader=_NeoXLoader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except ConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML ({problem})") from None
    try:
        if _count_values(data, MAX_VALUES) > MAX_VALUES:
            raise ConfigError(f"{path}: holds more than {MAX_VALUES} values once its YAML "
                              "aliases are expanded")
    except ConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{path}: key {raw_key!r} is not a string")
        name = canonical_name(raw_key)
        if name in out:
            raise ConfigError(f"{path}: {name}: set twice (as {spelled[name]!r} and {raw_key!r})")
        out[name] = value
        spelled[name] = raw_key
    return out


def _merge_into(
    values: dict[str, Any],
    sources: dict[str, str],
    overrides: list[Override],
    new: dict[str, Any],
    origin: str,
) -> tuple[dict[str, Any], dict[str, str], list[Override]]:
    for name, value in new.items():
        if name in values:
            old_file = sources[name]
            if _replaces_block(name, values[name], value):
                overrides.append(Override(name, old_file, origin, values[name], value))
                values[name] = value
            elif isinstance(values[name], dict) and isinstance(value, dict):
                merged = _deep_merge(values[name], value, name, old_file, origin, overrides)
                values[name] = merged
            else:
                overrides.append(Override(name, old_file, origin, values[name], value))
                values[name] = value
        else:
            values[name] = value
        sources[name] = origin
    return values, sources, overrides


TYPED_BLOCKS = ("optimizer", "scheduler")


def _replaces_block(name: str, old: Any, new: Any) -> bool:
    """An ``optimizer``/``scheduler`` block of another ``type`` replaces the earlier one whole:
    its params belong to the old type."""
    return (name in TYPED_BLOCKS and isinstance(old, dict) and isinstance(new, dict)
            and "type" in new and str(new["type"]).lower() != str(old.get("type", "")).lower())


def _deep_merge(
    old: dict[str, Any],
    new: dict[str, Any],
    path: str,
    old_file: str,
    new_file: str,
    overrides: list[Override],
) -> dict[str, Any]:
    out = dict(old)
    for k, v in new.items():
        sub = f"{path}.{k}"
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _deep_merge(out[k], v, sub, old_file, new_file, overrides)
        else:
            if k in out:
                overrides.append(Override(sub, old_file, new_file, out[k], v))
            out[k] = v
    return out


def merge_configs(named: Iterable[tuple[str, dict[str, Any]]]) -> MergedConfig:
    """Merge (file name, keys) pairs in order: later files win, nested blocks merge by key."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overrides: list[Override] = []
    files: list[str] = []
    for origin, data in named:
        files.append(origin)
        values, sources, overrides = _merge_into(values, sources, overrides, data, origin)
    return MergedConfig(values, sources, tuple(overrides), tuple(files))


def load_config_files(names: Sequence[str], conf_dir: str | None = None) -> MergedConfig:
    """Find, read and merge config files given by path or by name (without ``.yml``)."""
    if not names:
        raise ConfigError("no config files given")
    paths = [find_config_file(n, conf_dir) for n in names]
    merged = merge_configs((str(p), read_config_file(p)) for p in paths)
    texts = {str(p): _config_text(p) for p in paths}
    return MergedConfig(merged.values, merged.sources, merged.overrides, merged.files, texts)
