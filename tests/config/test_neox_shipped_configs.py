"""GPT-NeoX's own shipped config files (copies in fixtures/neox_configs/, origin and commits in its
README) dry-run here, or are refused with one line that names the key and what is missing.

A dry run of a model config, in process: read and merge the file as deepy.py does (a model-only
file together with GPT-NeoX's own llama2/train_config.yml, as GPT-NeoX's README pairs them),
add the paths a local setup file adds, resolve for an 8-rank job of CPU ranks with
``launching=False`` (machine facts such as fp16 or nccl on CPU ranks, or missing data files,
become warnings) and build the DeepSpeed config. The launch plan is not part of it: a hostfile
names machines, not the model (see test_hostfile_placeholder_stops_deepy).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron.model_size import parameter_count
from megatron.neox_arguments import (
    ConfigError,
    RunFacts,
    build_deepspeed_config,
    merge_configs,
    resolve_config,
)
from megatron.neox_arguments.loader import read_config_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "neox_configs"
TRAIN_SETUP = "llama2/train_config.yml"  # GPT-NeoX's training settings for model-only files
LOCAL_SETUP = {"data_path": "data/enwik8/enwik8_text_document",
               "vocab_file": "data/gpt2-vocab.json", "merge_file": "data/gpt2-merges.txt",
               "save": "checkpoints", "load": "checkpoints", "log_dir": "logs"}
WORLD_SIZE = 8  # enough for the largest layout among them (20B: 4 stages x 2 tensor ranks)

DRY_RUNS = "dry-runs"
# file -> DRY_RUNS, or (key, words) of its one-line refusal; a key in OWNED_ELSEWHERE may also
# dry-run once its feature lands (its refusal must still name that key)
EXPECTED: dict[str, str | tuple[str, str]] = {
    "19M.yml": DRY_RUNS,
    "125M.yml": DRY_RUNS,
    "125M-json.yml": DRY_RUNS,
    "125M-moe.yml": DRY_RUNS,
    "bf16_125M.yml": DRY_RUNS,
    "1-3B.yml": DRY_RUNS,
    "6-7B.yml": DRY_RUNS,
    "13B.yml": DRY_RUNS,
    "20B.yml": DRY_RUNS,
    "pythia/160M.yml": DRY_RUNS,
    "pythia/6-9B.yml": DRY_RUNS,
    "llama/7B.yml": DRY_RUNS,
    "llama2/7B.yml": DRY_RUNS,
    "llama2/7B_mlp_type_llama.yml": DRY_RUNS,
    "llama2/70B.yml": DRY_RUNS,
    "llama2/codellama_7B.yml": DRY_RUNS,
    "llama2/train_config.yml": DRY_RUNS,  # with llama2/7B.yml, below
    "mistral/7B.yml": DRY_RUNS,
    # with llama2/train_config.yml's fp16: DeepSpeed casts every parameter (GPT-NeoX keeps
    # A_log and D in fp32 through its DeepSpeed fork's no-cast flag)
    "mamba/mamba-130M.yml": ("mamba_selective_fp32_params", "cannot stay fp32 parameters"),
    "1-3B-transformer-engine.yml": ("te_layernorm_mlp", "transformer_engine"),
    "bnb_125M.yml": ("use_bnb_optimizer", "bitsandbytes"),
    "llemma/7B.yml": ("decay_lr_to", "set min_lr"),
    "FIM-160M.yml": ("extra_sentinel_tokens", "fill-in-the-middle training is not provided"),
    # GPT-NeoX's own typo: YAML reads 1.0e_8 as text
    "gmlp_small.yml": ("optimizer", "params.eps must be a number, got '1.0e_8'"),
    # sets output_layer_init_method twice (single_residual_scaled_normal, then wang_init)
    "rwkv/170M.yml": ("output_layer_init_method", "is set twice in one mapping"),
}
OWNED_ELSEWHERE = {"te_layernorm_mlp", "use_bnb_optimizer"}
MODEL_ONLY = {"llama/7B.yml", "llama2/7B.yml", "llama2/7B_mlp_type_llama.yml", "llama2/70B.yml",
              "llama2/codellama_7B.yml", "mistral/7B.yml", "mamba/mamba-130M.yml"}


def stored_files() -> list[str]:
    return sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.yml"))


def dry_run(name: str, **extra):
    """The resolved config and DeepSpeed dict of fixture ``name``, as a dry run builds them."""
    files = [(name, read_config_file(FIXTURES / name))]
    if name in MODEL_ONLY or name == TRAIN_SETUP:
        partner = TRAIN_SETUP if name != TRAIN_SETUP else "llama2/7B.yml"
        files.append((partner, read_config_file(FIXTURES / partner)))
    files.append(("local_setup.yml", {**LOCAL_SETUP, **extra}))
    cfg = resolve_config(merge_configs(files), RunFacts(world_size=WORLD_SIZE, gpu=False,
                                                        launching=False, purpose="train"))
    return cfg, build_deepspeed_config(cfg)


def test_every_stored_config_has_an_expectation():
    assert stored_files() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e == DRY_RUNS))
def test_shipped_config_dry_runs(name):
    values = read_config_file(FIXTURES / name)
    cfg, ds = dry_run(name)
    if "num_layers" in values:
        assert cfg.model.num_layers == values["num_layers"]
        assert cfg.model.hidden_size == values["hidden_size"]
    dp = cfg.parallelism.data_parallel_size
    assert dp * cfg.parallelism.model_parallel_size * max(1, cfg.parallelism.pipe_parallel_size) \
        == WORLD_SIZE
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * \
        ds["gradient_accumulation_steps"] * dp
    assert ds["gradient_clipping"] == values.get("gradient_clipping", 1.0)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if e != DRY_RUNS))
def test_shipped_config_refused_in_one_line(name):
    key, words = EXPECTED[name]
    try:
        dry_run(name)
    except ConfigError as exc:
        message = str(exc)
    else:
        assert key in OWNED_ELSEWHERE, f"{name} dry-runs; expected a refusal naming {key}"
        return
    assert message.startswith((name, str(FIXTURES / name))) and "\n" not in message, message
    assert f": {key}" in message or f"'{key}'" in message, message
    if key not in OWNED_ELSEWHERE:
        assert words in message, message


# Parameter counts of the real models (Hugging Face / the Pythia and GPT-NeoX-20B papers), at
# the tokenizer's vocabulary. GPT-NeoX's current Llama-2 files leave use_bias_in_mlp at its
# default (true), so GPT-NeoX builds MLP biases for them: the real model's count plus
# layers x (2 x mlp width + hidden); with use_bias_in_mlp: false it is the real model.
REAL_MODELS = [  # file, vocabulary, parameters, MLP width, MLP bias parameters of the file
    ("llama2/7B.yml", 32000, 6_738_415_616, 11008, 32 * (2 * 11008 + 4096)),
    ("llama2/70B.yml", 32000, 68_976_648_192, 28672, 80 * (2 * 28672 + 8192)),
    # GPT-NeoX's legacy Llama MLP (mlp_type: llama): 8/3 x hidden rounded to 256, no biases
    ("llama/7B.yml", 32000, 6_738_415_616, 11008, 0),
    ("llama2/7B_mlp_type_llama.yml", 32000, 6_738_415_616, 11008, 0),
    ("pythia/160M.yml", 50304, 162_322_944, 3072, 0),
    ("pythia/6-9B.yml", 50432, 6_857_302_016, 16384, 0),
    ("20B.yml", 50432, 20_554_567_680, 24576, 0),
]


@pytest.mark.parametrize("name, vocab, real, width, mlp_bias", REAL_MODELS,
                         ids=[r[0] for r in REAL_MODELS])
def test_shipped_config_builds_the_real_model(name, vocab, real, width, mlp_bias):
    from megatron.model.args import mlp_width

    cfg, _ = dry_run(name)
    assert mlp_width(cfg.model, cfg.model.activation) == width
    assert parameter_count(cfg.model, vocab) == real + mlp_bias
    if mlp_bias:
        cfg, _ = dry_run(name, use_bias_in_mlp=False)
        assert parameter_count(cfg.model, vocab) == real


def test_hostfile_placeholder_stops_deepy(capsys, monkeypatch):
    """GPT-NeoX's 125M files name a placeholder hostfile (/mock_path). DeepSpeed's runner would
    quietly fall back to this machine; deepy.py stops with one line naming the file."""
    from megatron.launch.cli import main

    monkeypatch.chdir(ROOT)
    code = main(["--dry-run", "train.py", str(FIXTURES / "125M.yml"), "--data_path", "d",
                 "--vocab_file", "v.json", "--merge_file", "m.txt"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"deepy.py: error: {FIXTURES / '125M.yml'}: hostfile: /mock_path not found"


def test_deepy_dry_run_of_a_shipped_config(tmp_path):
    """The one subprocess: ``deepy.py --dry-run`` on Pythia-160M with a local setup file."""
    setup = tmp_path / "local_setup.yml"
    setup.write_text("data_path: data/none\nvocab_file: data/tokenizer.json\n")
    out = subprocess.run([sys.executable, "deepy.py", "--dry-run", "train.py",
                          str(FIXTURES / "pythia/160M.yml"), str(setup), "--num_gpus", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "launch command:" and "deepspeed.launcher.runner" in lines[-1]
    assert "--num_gpus 2" in lines[-1]
