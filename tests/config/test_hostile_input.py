"""Damaged and hostile config files end in one ConfigError naming the file and key: never a
traceback, a hang, or a value accepted by --dry-run that the launch would refuse."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.neox_arguments import ConfigError, RunFacts, load_config_files, resolve_config
from tests.config.cfg_helpers import make_cfg

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yml"))


def _load(path: Path) -> None:
    merged = load_config_files([str(path)])
    resolve_config(merged, RunFacts(world_size=1, launching=False, purpose="train"))


def _refused(tmp_path: Path, text: str | bytes, match: str, name: str = "bad.yml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config_files([str(path)])
    assert str(info.value).startswith(str(path))
    return str(info.value)


def test_duplicate_keys_at_any_depth_are_refused(tmp_path):
    _refused(tmp_path, "num_layers: 2\nnum_layers: 3\n", "'num_layers' is set twice")
    _refused(tmp_path, "optimizer:\n  type: Adam\n  params:\n    lr: 1\n    lr: 2\n",
             r"line 5: .*'lr' is set twice in one mapping, to different values \(lines 4 and 5\)")
    _refused(tmp_path, '{"num_layers": 2, "num_layers": 3}', "'num_layers' is set twice",
             name="bad.json")
    _refused(tmp_path, "a: {b: [1, 2]}\na: {b: [1, 3]}\n", "'a' is set twice")


def test_a_key_repeated_with_the_same_value_is_accepted(tmp_path):
    """GPT-NeoX's own 20B config sets init_method twice, to the same value."""
    path = tmp_path / "same.yml"
    path.write_text("init_method: small_init\nnum_layers: 2\ninit_method: small_init\n")
    assert load_config_files([str(path)]).values["init_method"] == "small_init"


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    _refused(tmp_path, b"\xff\xfe\x00\x01binary", "a binary file")
    _refused(tmp_path, "num_layers: 2\n# caf\xe9\n".encode("latin-1"),
             r"line 2: not UTF-8 text \(byte 0xe9\)")


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    deep = "a: " + "[" * 20000 + "]" * 20000 + "\n"
    _refused(tmp_path, deep, "nested deeper than 64 levels")
    _refused(tmp_path, '{"a": ' + "[" * 20000 + "]" * 20000 + "}", "nested deeper",
             name="bad.json")
    # brackets inside JSON strings are not nesting
    ok = tmp_path / "ok.json"
    ok.write_text('{"a": "[[[[\\\\\\"[[[", "b": [[1]]}')
    assert load_config_files([str(ok)]).values["b"] == [[1]]


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    start = time.monotonic()
    _refused(tmp_path, "\n".join(lines) + "\n", "more than 100000 values")
    assert time.monotonic() - start < 30  # a hang would hit the test timeout instead


@pytest.mark.parametrize("overrides, key, message", [
    ({"num_layers": 10**12}, "num_layers", "beyond what can be built"),
    ({"gradient_clipping": float("nan")}, "gradient_clipping", "finite"),
    ({"weight_decay": float("inf")}, "weight_decay", "finite"),
    ({"split": "a,b,c"}, "split", "comma-separated numbers"),
    ({"optimizer": {"type": "Adam", "params": {"lrr": 0.1, "lr": 0.001}}}, "optimizer",
     "params.lrr: not a parameter"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9]}}}, "optimizer",
     "betas: needs two numbers"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 1.5]}}}, "optimizer",
     r"betas must be in \[0, 1\)"),
    ({"optimizer": {"type": "Adam", "params": {"lr": -1}}}, "optimizer", "must not be negative"),
    ({"lr": -0.5}, "lr", "must not be negative"),
    ({"num_gpus": 0}, "num_gpus", "at least 1"),
    ({"master_addr": "127.0.0.1;touch pwned;"}, "master_addr", "not a host name"),
    ({"master_addr": "$(reboot)"}, "master_addr", "not a host name"),
])  # fmt: skip
def test_values_the_launch_would_refuse_are_refused_at_validation(overrides, key, message):
    with pytest.raises(ConfigError, match=f"a.yml: {key}: .*{message}"):
        make_cfg(**overrides)


@pytest.mark.parametrize("addr", ["127.0.0.1", "node-01", "gpu7.cluster.example", "::1",
                                  "fe80::1%eth0"])
def test_ordinary_master_addresses_are_accepted(addr):
    assert make_cfg(master_addr=addr).launcher.master_addr == addr


def test_dry_run_refuses_a_hostile_master_addr_before_any_command_is_built(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("data_path: data/none\ntokenizer_type: CharLevelTokenizer\n"
                   "master_addr: '127.0.0.1;touch pwned;'\n")
    (tmp_path / "train.py").write_text("")
    out = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "--dry-run", "train.py",
                          str(ROOT / "configs" / "tiny_neox.yml"), str(cfg)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "master_addr: '127.0.0.1;touch pwned;' is not a host name" in out.stderr
    assert "Traceback" not in out.stderr and "touch pwned" not in out.stdout


def _mutations(text: str, rng: random.Random) -> list[str]:
    lines = text.splitlines(keepends=True) or ["\n"]
    out = []
    for _ in range(6):
        i = rng.randrange(len(lines))
        choice = rng.randrange(7)
        mutated = list(lines)
        if choice == 0:  # drop a line
            del mutated[i]
        elif choice == 1:  # duplicate a line
            mutated.insert(i, lines[i])
        elif choice == 2:  # a number becomes something else
            replacement = rng.choice([".nan", "-1", "1e400", "0", "10000000000000", "'x'",
                                      "[]", "{}", "null", "-.inf"])
            mutated[i] = __import__("re").sub(r"-?\d+(\.\d+)?(e-?\d+)?", replacement,
                                              lines[i], count=1)
        elif choice == 3:  # truncate the file mid-line
            mutated = lines[:i] + [lines[i][: len(lines[i]) // 2]]
        elif choice == 4:  # a byte flipped
            raw = bytearray(lines[i].encode())
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            mutated[i] = raw.decode("utf-8", errors="replace")
        elif choice == 5:  # indentation broken
            mutated[i] = "   " + lines[i]
        else:  # an alias to an anchor that does not exist
            mutated[i] = lines[i].rstrip("\n") + " *nowhere\n"
        out.append("".join(mutated))
    return out


def test_fuzzed_shipped_configs_load_or_fail_with_one_config_error(tmp_path):
    """Seeded mutations of every shipped config: each one loads and resolves, or stops with a
    ConfigError that names the file; no other exception escapes."""
    assert len(SHIPPED) > 10
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "refused": 0}
    for shipped in SHIPPED:
        for n, text in enumerate(_mutations(shipped.read_text(), rng)):
            path = tmp_path / f"{shipped.stem}_{n}.yml"
            path.write_text(text)
            try:
                _load(path)
            except ConfigError as exc:
                assert str(path) in str(exc), str(exc)
                outcomes["refused"] += 1
            else:
                outcomes["loaded"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] + outcomes["refused"] == 6 * len(SHIPPED)
