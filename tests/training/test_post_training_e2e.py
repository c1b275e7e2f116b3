"""Every post-training method through ``deepy.py train.py`` on 2 CPU ranks, from GPT-NeoX's
own post-training configs scaled down (ZeRO stage 1 as in the originals): the method's values
are logged and a run resumed from its middle checkpoint continues exactly. DPO: the reference
model travels with the checkpoint. RM: starts from a language model's checkpoint (the reward
head freshly initialised). KTO: unpaired data, reference in the checkpoint. ORPO. SFT on
masked chat data with LoRA adapters over two pipeline stages (tied embeddings)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.manifest import LATEST
from megatron.training.post_training import METRIC_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import explain, records, run_deepy, write_config  # noqa: E402
from posttrain_helpers import (  # noqa: E402
    pairwise_values,
    write_chat,
    write_pairwise,
    write_unpaired,
)

NEOX = "tests/config/neox_post_training/llama3-8b-{}.yml"
NEOX_DPO = NEOX.format("dpo")
METHOD_VALUES = {"rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
                 "kl_chosen"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return pairwise_values(write_pairwise(d, "train", 200, 21), write_pairwise(d, "valid", 32, 22))


def _values(pairs, run: Path, **extra):
    """GPT-NeoX's llama3-8b DPO config scaled down to a CPU run on the synthetic pairs."""
    return {
        **pairs, "pos_test_data_paths": None, "neg_test_data_paths": None,
        "pos_test_label_data_paths": None, "neg_test_label_data_paths": None,
        "num_gpus": 2, "model_parallel_size": 1, "num_layers": 2, "hidden_size": 64,
        "num_attention_heads": 4, "num_kv_heads": 2, "seq_length": 64,
        "max_position_embeddings": 64, "attention_config": [[["global"], 2]],
        "intermediate_size": 128, "mlp_multiple_of": 128, "make_vocab_size_divisible_by": 8,
        "tokenizer_type": "CharLevelTokenizer", "vocab-file": None, "precision": "fp32",
        "bf16": {"enabled": False}, "distributed_backend": "gloo", "use_wandb": False,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "num_workers": 0, "train_iters": 4, "lr_decay_iters": 4, "eval_interval": 2,
        "eval_iters": 1, "do_test": False, "dpo_beta": 0.1, "load": None, "finetune": False,
        "checkpoint_factor": 2, "log_dir": str(run / "logs"), "wall_clock_breakdown": False,
        **extra,
    }


def test_dpo_trains_logs_and_resumes_exactly(pairs, tmp_path):
    full = tmp_path / "full"
    cfg = write_config(tmp_path / "full.yml", _values(
        pairs, full, save=str(full / "ckpt")))
    proc = run_deepy(NEOX_DPO, cfg)
    assert proc.returncode == 0, explain(proc)
    train = {r["iteration"]: r for r in records(full)}
    assert sorted(train) == [1, 2, 3, 4]
    assert METHOD_VALUES <= set(train[4])
    # the policy starts as its reference: loss log 2, every reward 0
    assert train[1]["lm_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert train[1]["rewards_margin"] == 0.0
    evals = records(full, "eval")
    assert [e["iteration"] for e in evals] == [2, 4]
    assert METHOD_VALUES <= set(evals[-1])

    # resume from the step-2 checkpoint in a new directory: steps 3 and 4 are the same
    resumed = tmp_path / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "global_step2", resumed / "ckpt" / "global_step2")
    (resumed / "ckpt" / LATEST).write_text("global_step2")
    cfg = write_config(tmp_path / "resumed.yml", _values(
        pairs, resumed, load=str(resumed / "ckpt"), save=str(resumed / "ckpt")))
    proc = run_deepy(NEOX_DPO, cfg)
    assert proc.returncode == 0, explain(proc)
    again = {r["iteration"]: r for r in records(resumed)}
    assert sorted(again) == [3, 4]
    for it in (3, 4):
        for k in ("lm_loss", *METHOD_VALUES):
            assert again[it][k] == train[it][k], (it, k, again[it][k], train[it][k])
    # the reference is the starting model, not the resumed policy: KL stays positive
    assert again[4]["kl_chosen"] != 0.0
    manifest = json.loads((resumed / "ckpt" / "global_step4" / "manifest.json").read_text())
    assert manifest["iteration"] == 4


def _full_then_resume(tmp_path: Path, base: str, values: dict, first: dict | None = None,
                      steps: int = 4) -> tuple[dict[int, dict], dict[int, dict], Path]:
    """Train ``steps`` iterations saving at half way (``first`` adds to that run's values:
    where it starts from), then resume from the half-way checkpoint (chosen with the
    ``iteration`` key) into another directory; returns both runs' train records by
    iteration and the first run's directory."""
    half = steps // 2
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = {**values, "train_iters": steps, "lr_decay_iters": steps, "checkpoint_factor": half,
              "eval_interval": half}
    cfg = write_config(tmp_path / "full.yml", {**common, "log_dir": str(full / "logs"),
                                               "save": str(full / "ckpt"), **(first or {})})
    proc = run_deepy(base, cfg)
    assert proc.returncode == 0, explain(proc)
    cfg = write_config(tmp_path / "resumed.yml", {
        **common, "log_dir": str(resumed / "logs"), "load": str(full / "ckpt"),
        "iteration": half, "finetune": False, "save": str(resumed / "ckpt")})
    proc = run_deepy(base, cfg)
    assert proc.returncode == 0, explain(proc)
    train = {r["iteration"]: r for r in records(full)}
    again = {r["iteration"]: r for r in records(resumed)}
    assert sorted(train) == list(range(1, steps + 1))
    assert sorted(again) == list(range(half + 1, steps + 1))
    return train, again, full


def _same_after_resume(train: dict, again: dict, names: tuple[str, ...]) -> None:
    for it, record in again.items():
        for k in ("lm_loss", *names):
            if k in train[it] or k == "lm_loss":
                assert record[k] == train[it][k], (it, k, record.get(k), train[it][k])


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
    d = tmp_path_factory.mktemp("unpaired")
    train, valid = write_unpaired(d, "train", 200, 23), write_unpaired(d, "valid", 32, 24)
    return {"train_data_paths": [train["data"]],
            "train_label_data_paths": [train["label"]],
            "train_reward_data_paths": [train["reward"]],
            "valid_data_paths": [valid["data"]], "valid_label_data_paths": [valid["label"]],
            "valid_reward_data_paths": [valid["reward"]], "test_data_paths": None,
            "test_label_data_paths": None, "test_reward_data_paths": None}


def _resolved(base: str, values: dict, directory: Path):
    """The run's config as the trainer resolves it (2 ranks)."""
    from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
    from megatron.neox_arguments.loader import read_config_file
    from megatron.tokenizer import build_tokenizer

    root = Path(__file__).resolve().parents[2]
    extra = Path(write_config(directory / "resolved.yml", values))
    merged = merge_configs([(base, read_config_file(root / base)),
                            (str(extra), read_config_file(extra))])
    cfg = resolve_config(merged, RunFacts(world_size=2, launching=False, purpose=None))
    return cfg.with_vocab_size(build_tokenizer("CharLevelTokenizer").vocab_size)


def _lm_checkpoint(values: dict, base: str, directory: Path) -> tuple[str, dict]:
    """A language model's checkpoint (no reward head) of the run's model shape."""
    from megatron.checkpoint.weights import write_checkpoint
    from megatron.model import GPTModel
    from megatron.parallel import ParallelState

    directory.mkdir(parents=True)
    cfg = _resolved(base, values, directory)
    lm = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                  state=ParallelState.single(), init_seed=77)
    state = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    write_checkpoint(directory, state, cfg.model)
    return str(directory), state


def test_rm_starts_from_a_language_model_and_resumes_exactly(pairs, tmp_path):
    from megatron.checkpoint.weights import inspect_checkpoint, read_shard

    base = NEOX.format("rm")
    values = _values(pairs, tmp_path, train_impl="rm", weight_decay=0.0)
    lm_dir, lm = _lm_checkpoint(values, base, tmp_path / "lm")
    train, again, full = _full_then_resume(tmp_path, base, values,
                                           first={"load": lm_dir, "finetune": True})
    names = METRIC_NAMES["rm"]
    assert set(names) <= set(train[4]) and set(names) <= set(records(full, "eval")[-1])
    _same_after_resume(train, again, names)
    # the language model's weights were the start: the output layer, which the reward model
    # does not use, is still exactly the language model's; the head is new
    ckpt = inspect_checkpoint(full / "ckpt" / "global_step4")
    rm = read_shard(ckpt, 0, None)  # type: ignore[arg-type]
    assert torch.equal(rm["output_layer.weight"], lm["output_layer.weight"])
    assert not torch.equal(rm["layers.0.attention.dense.weight"],
                           lm["layers.0.attention.dense.weight"])
    assert "reward_head.proj.weight" in rm and "reward_head.proj.weight" not in lm


def test_orpo_trains_logs_and_resumes_exactly(pairs, tmp_path):
    train, again, _ = _full_then_resume(tmp_path, NEOX_DPO, _values(
        pairs, tmp_path, train_impl="orpo", orpo_lambda=0.1))
    names = METRIC_NAMES["orpo"]
    assert set(names) <= set(train[4])
    _same_after_resume(train, again, names)


def test_kto_trains_logs_and_resumes_exactly(pairs, unpaired, tmp_path):
    train, again, _ = _full_then_resume(tmp_path, NEOX.format("kto"),
                                        _unpaired_values(pairs, unpaired, tmp_path))
    assert {"rewards_chosen", "rewards_rejected", "kl"} <= set(train[4])
    _same_after_resume(train, again, METRIC_NAMES["kto"])


def _unpaired_values(pairs, data, run: Path, **extra) -> dict:
    """The scaled-down values with one-document-per-sample data instead of pairs."""
    values = {k: v for k, v in _values(pairs, run, **extra).items()
              if not k.startswith(("pos_", "neg_")) and k not in ("dataset_impl", "dpo_beta")}
    return {**values, **data}


def test_sft_with_lora_over_two_pipeline_stages_resumes_exactly(pairs, tmp_path):
    d = tmp_path / "chat"
    d.mkdir()
    train, valid = write_chat(d, "train", 200, 25), write_chat(d, "valid", 32, 26)
    data = {"train_data_paths": [train["data"]], "train_label_data_paths": [train["label"]],
            "valid_data_paths": [valid["data"]], "valid_label_data_paths": [valid["label"]],
            "test_data_paths": None, "test_label_data_paths": None}
    values = _unpaired_values(pairs, data, tmp_path, pipe_parallel_size=2,
                              no_weight_tying=False, lora_rank=4, lora_alpha=8,
                              lora_target_modules=["query_key_value", "dense",
                                                   "dense_h_to_4h", "dense_4h_to_h"])
    train_rec, again, full = _full_then_resume(tmp_path, NEOX.format("sft"), values)
    _same_after_resume(train_rec, again, ())
    assert train_rec[4]["lm_loss"] < train_rec[1]["lm_loss"]
    # the pipeline checkpoint holds the adapters; the base weights did not move
    from megatron.checkpoint.weights import inspect_checkpoint, read_shard

    cfg = _resolved(NEOX.format("sft"), values, tmp_path)
    first, last = (read_shard(inspect_checkpoint(full / "ckpt" / f"global_step{i}"), 0,
                              cfg.model) for i in (2, 4))
    adapters = [k for k in last if ".lora_" in k]
    assert len(adapters) == 2 * 4 * 2  # A and B of four layer kinds in both layers
    assert any(not torch.equal(first[k], last[k]) for k in adapters)
    for k in last:
        if ".lora_" not in k:
            assert torch.equal(first[k], last[k]), k
