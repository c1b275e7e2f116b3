"""A mixture-of-experts model through deepy.py on 2 ranks with expert parallelism 2: it
trains and logs the routing statistics every step; its checkpoint of step 2 resumes at expert
parallelism 1 and gives step 3's loss of the uninterrupted run."""

from __future__ import annotations

import pytest
from e2e_helpers import (
    base_values,
    build_char_corpus,
    explain,
    losses,
    records,
    run_deepy,
    write_config,
)

pytestmark = pytest.mark.slow

MOE = {"train_iters": 3, "num_gpus": 2, "moe_num_experts": 4, "moe_top_k": 2,
       "moe_router_type": "topk", "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 0.001,
       "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2,
       "zero_optimization": {"stage": 1},
       "optimizer": {"type": "AdamW", "params": {"lr": 0.002}}}


def test_moe_trains_with_expert_parallelism_and_logs_routing(tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = build_char_corpus(tmp_path / "corpus", max_docs=100)
    full = tmp_path / "full"
    ckpt = tmp_path / "ckpt"
    values = base_values(corpus, full, expert_model_parallel_size=2, save=str(ckpt),
                         save_interval=2, **MOE)
    first = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "a.yml", values))
    assert first.returncode == 0, explain(first)
    logged = records(full)
    assert [r["iteration"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0
        assert 0 < r["moe_tokens_per_expert_min"] <= r["moe_tokens_per_expert_max"]
        assert r["moe_expert_imbalance"] >= 1.0 and r["moe_dropped_fraction"] == 0.0
        assert 0 < r["lm_loss"] < 10
    # the checkpoint of step 2 (expert shards of 2 ranks) resumed at expert parallelism 1
    resumed = tmp_path / "resumed"
    values = base_values(corpus, resumed, load=str(ckpt), iteration=2, **MOE)
    second = run_deepy("configs/tiny_neox.yml", write_config(tmp_path / "b.yml", values))
    assert second.returncode == 0, explain(second)
    assert "resharding the model and optimizer state" in second.stdout, second.stdout[-3000:]
    got, want = losses(resumed), losses(full)
    assert sorted(got) == [3], got
    assert got[3] == pytest.approx(want[3], rel=1e-5, abs=0)
