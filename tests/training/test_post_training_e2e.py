"""DPO through ``deepy.py train.py`` on 2 CPU ranks, from GPT-NeoX's own DPO config scaled
down (ZeRO stage 1 as in the original): the method's values are logged, the reference model
travels with the checkpoint, and a resumed run continues exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from megatron.checkpoint.manifest import LATEST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import explain, records, run_deepy, write_config  # noqa: E402
from posttrain_helpers import pairwise_values, write_pairwise  # noqa: E402

NEOX_DPO = "tests/config/neox_post_training/llama3-8b-dpo.yml"
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
