"""Every parallel mode through deepy.py against the single-process run from the same seed.

All runs see the same global batch of 8 samples per step (1 rank: micro batch 4 x 2
accumulation steps; data parallel: 2 ranks x 4; tensor and pipeline parallel: 1 replica x 4 x 2)
and start from the same weights (layer-wise seeded init), so their per-step losses must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import base_values, build_char_corpus, explain, losses, run_deepy, write_config

pytestmark = pytest.mark.slow

STEPS = 5
MODEL = {"no_weight_tying": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
         "train_iters": STEPS, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
         "gradient_accumulation_steps": None,
         "optimizer": {"type": "AdamW", "params": {"lr": 0.003}}, "warmup": 0.0,
         "gradient_clipping": 1.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_char_corpus(tmp_path_factory.mktemp("corpus"))


def train(corpus: str, tmp: Path, name: str, **extra) -> Path:
    run = tmp / name
    cfg = write_config(tmp / f"{name}.yml", base_values(corpus, run, **{**MODEL, **extra}))
    before = shm_segments()
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    assert proc.returncode == 0, explain(proc)
    # DeepSpeed's CPU all-reduce maps 66 MB per rank in /dev/shm; a run must not leave it behind
    assert shm_segments() - before == set()
    return run


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    run = train(corpus, tmp_path_factory.mktemp("ref"), "single", num_gpus=1)
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def assert_same_losses(got: dict[int, float], want: dict[int, float], rel: float = 1e-5):
    assert sorted(got) == sorted(want)
    for it in want:
        assert got[it] == pytest.approx(want[it], rel=rel), (it, got[it], want[it])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_data_parallel_zero_stage_matches_single_process(corpus, tmp_path, reference, stage):
    run = train(corpus, tmp_path, f"zero{stage}", num_gpus=2,
                zero_optimization={"stage": stage})
    assert_same_losses(losses(run), reference)


def test_tensor_parallel_matches_single_process(corpus, tmp_path, reference):
    run = train(corpus, tmp_path, "tp2", num_gpus=2, model_parallel_size=2)
    assert_same_losses(losses(run), reference)


def test_pipeline_parallel_matches_single_process_and_keeps_embeddings_tied(
        corpus, tmp_path, reference):
    run = train(corpus, tmp_path, "pp2", num_gpus=2, pipe_parallel_size=2,
                save=str(tmp_path / "pp2" / "ckpt"))
    assert_same_losses(losses(run), reference)
    # the first and the last stage hold one copy each of the tied embedding
    log = (run / "logs" / "run.log").read_text()
    assert "tied weights: max |difference| between stages 0\n" in log
    step = tmp_path / "pp2" / "ckpt" / f"global_step{STEPS}"
    assert len(list(step.glob("layer_*-model_states.pt"))) == 4  # embed, 2 layers, norm


def test_bf16_data_parallel_stays_close_to_fp32(corpus, tmp_path, reference):
    run = train(corpus, tmp_path, "bf16", num_gpus=2, zero_optimization={"stage": 1},
                bf16={"enabled": True})
    assert_same_losses(losses(run), reference, rel=2e-2)
