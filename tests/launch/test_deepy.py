"""deepy.py: dry runs of every shipped config, overrides, launcher flags and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron.launch import cli
from megatron.neox_arguments import MergedConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yml"))


def is_model_config(path: Path) -> bool:
    return "num_layers" in path.read_text().replace("-", "_")


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory):
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text("".join(f"node{i} slots=8\n" for i in range(8)))
    return str(path)


def run_deepy(argv, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_passes_dry_run(config, hostfile, capsys, monkeypatch):
    if is_model_config(ROOT / config):
        files = [str(config), "configs/local_setup.yml"]
    else:
        files = ["configs/125M.yml", "configs/local_setup.yml", str(config)]
    script = "generate.py" if "generation" in str(config) else "train.py"
    code, out, err = run_deepy(["--dry-run", "-H", hostfile, script, *files], capsys,
                               monkeypatch)
    assert code == 0, err
    assert "launch command:" in out
    command = out.strip().splitlines()[-1]
    assert "deepspeed.launcher.runner" in command and f" {script} --neox_config " in command


def test_dry_run_of_125m_prints_the_command_and_the_config(capsys, monkeypatch):
    code, out, err = run_deepy(["--dry-run", "train.py", "configs/125M.yml",
                                "configs/local_setup.yml"], capsys, monkeypatch)
    assert code == 0, err
    assert "12 layers, hidden 768" in out
    assert "deepspeed config: " in out
    # the fp16 config planned for GPUs is only a warning in a dry run on a CPU machine
    assert "warning: configs/125M.yml: fp16: fp16 needs GPUs" in out
    blob = out.strip().splitlines()[-1].split("--neox_config ")[1].split()[0]
    merged = MergedConfig.decode(blob)
    assert merged.values["num_layers"] == 12
    assert merged.values["data_path"] == "data/pydocs/pydocs_text_document"


def test_dry_run_lists_overrides_with_both_files(tmp_path, capsys, monkeypatch):
    override = tmp_path / "override.yml"
    override.write_text("seq_length: 1024\nzero_optimization: {stage: 0}\n")
    code, out, err = run_deepy(["--dry-run", "train.py", "configs/125M.yml",
                                "configs/local_setup.yml", str(override), "--train_iters", "7"],
                               capsys, monkeypatch)
    assert code == 0, err
    assert f"seq_length: 2048 (configs/125M.yml) -> 1024 ({override})" in out
    assert f"zero_optimization.stage: 1 (configs/125M.yml) -> 0 ({override})" in out
    assert "train_iters: 320000 (configs/125M.yml) -> 7 (<command line>)" in out


def test_names_without_suffix_and_conf_dir(capsys, monkeypatch):
    code, out, err = run_deepy(["--dry-run", "-d", "configs", "train.py", "125M",
                                "local_setup"], capsys, monkeypatch)
    assert code == 0, err
    assert "config files: configs/125M.yml, configs/local_setup.yml" in out


def test_launcher_flags_reach_the_command(capsys, monkeypatch):
    code, out, err = run_deepy(["--dry-run", "--num_gpus", "2", "--master_port", "29999",
                                "train.py", "configs/tiny_neox.yml", "configs/local_setup.yml"],
                               capsys, monkeypatch)
    assert code == 0, err
    assert "ranks: 2 = pipeline 1 x tensor 1 x data 2" in out
    assert "--num_gpus 2 --master_port 29999" in out


def test_invalid_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 8\n"
                   "hiden_dropout: 0.1\n")
    proc = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"deepy.py: error: {bad}: hiden_dropout: unknown key "
                                   "(did you mean hidden_dropout, attention_dropout, lora_dropout?)")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_launch_errors_are_checked_before_anything_starts(capsys, monkeypatch):
    # not a dry run: the fp16 config on CPU ranks is an error, and nothing is executed
    monkeypatch.setattr(cli, "supervise", lambda *a: pytest.fail("must not launch"))
    code, out, err = run_deepy(["train.py", "configs/125M.yml", "configs/local_setup.yml"],
                               capsys, monkeypatch)
    assert code == 2
    assert err.startswith("deepy.py: error: configs/125M.yml: fp16: fp16 needs GPUs")


def test_missing_user_script(capsys, monkeypatch):
    code, _, err = run_deepy(["--dry-run", "nope.py", "configs/125M.yml"], capsys, monkeypatch)
    assert code == 2 and "nope.py: user script not found" in err
