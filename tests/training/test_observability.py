"""The trainer's observability keys on 2 in-process gloo ranks: ``profile`` (a trace of the
chosen steps only), ``log_param_norm`` / ``log_grad_norm`` / ``log_grad_pct_zeros`` /
``log_optimizer_states`` (full-parameter values under tensor parallelism and ZeRO, against norms
computed from the model), ``log_gradient_noise_scale``, ``curriculum_learning`` (the per-step
``curriculum_seqlen``), ``char_level_ppl`` and ``checkpoint_validation_with_forward_pass``
(a matching load passes, a mismatched model fails with one line).

One training run (tensor parallel 2) saves the checkpoint the two loads use; a second run
(data parallel 2, ZeRO stage 2) checks the per-parameter values over ZeRO partitions.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from e2e_helpers import base_values, build_char_corpus

from megatron.training.curriculum import SeqlenCurriculum
from tests.distributed import run_distributed

STEPS = 6
PROFILE = (2, 4)  # profile_step_start, profile_step_stop: iterations 3 and 4 are traced
CURRICULUM = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 16,
              "max_difficulty": 64, "schedule_type": "fixed_linear",
              "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 8}}
MODEL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64,
         "max_position_embeddings": 64, "norm": "layernorm", "pos_emb": "rotary",
         "activation": "gelu", "no_weight_tying": True, "make_vocab_size_divisible_by": 8,
         "hidden_dropout": 0.0, "attention_dropout": 0.0, "seed": 1234,
         "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95]}},
         "weight_decay": 0.0, "gradient_clipping": 0.0, "warmup": 0.0,
         "train_iters": STEPS, "train_micro_batch_size_per_gpu": 2,
         "gradient_accumulation_steps": 1,
         "log_param_norm": True, "log_grad_norm": True, "log_grad_pct_zeros": True,
         "log_optimizer_states": True, "log_gradient_noise_scale": True,
         "gradient_noise_scale_n_batches": 2}


def _config(tmp: Path, name: str, corpus: str, **extra: Any) -> str:
    run = tmp / name
    values = base_values(corpus, run, **{**MODEL, **extra})
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _train(rank: int, world: int, config: str, saved: str | None = None) -> Any:
    """A real ``train()`` run; returns the one-line error of a failed checkpoint load, or with
    ``saved`` (the checkpoint the run writes) the parameter norms computed from it."""
    import deepspeed

    from megatron.checkpoint import CheckpointError
    from megatron.training.loop import train

    # DeepSpeed's communication backend over the harness's process group (pipeline modules)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    try:
        train([config])
    except CheckpointError as exc:
        return str(exc)
    return None if saved is None else _direct_norms(config, saved)


def _direct_norms(config: str, ckpt: str) -> dict[str, float]:
    """Parameter norms straight from the saved weights: tensor-parallel shards are gathered
    into the full parameter."""
    from megatron.model import build_model
    from megatron.parallel.layers import is_tensor_parallel
    from megatron.parallel.mappings import all_gather_dim
    from megatron.runtime import start

    rt = start([config], purpose="train")
    cfg = rt.cfg
    model = build_model(cfg.model, cfg.act_ckpt, cfg.parallelism,
                        padded_vocab_size=cfg.tokenizer.padded_vocab_size, state=rt.state,
                        tracker=rt.tracker, init_seed=cfg.training.seed)
    files = sorted(glob.glob(f"{ckpt}/mp_rank_*_model_states.pt"))
    saved = torch.load(files[rt.state.tp_rank], map_location="cpu", weights_only=False)
    model.load_state_dict(saved["module"])
    out = {}
    for name, p in model.named_parameters():
        full = all_gather_dim(p.detach(), p.partition_dim, rt.state.tp_group) \
            if is_tensor_parallel(p) else p.detach()
        out[name] = float(full.double().norm())
    return out


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _trace_iterations(directory: Path) -> dict[int, list[int]]:
    """The ``iteration <n>`` ranges in each rank's trace file."""
    found: dict[int, list[int]] = {}
    for path in directory.glob("rank*.pt.trace.json*"):
        rank = int(path.name.split(".")[0][len("rank"):])
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f)["traceEvents"]
        found[rank] = sorted({int(e["name"].split()[1]) for e in events
                              if str(e.get("name", "")).startswith("iteration ")})
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return build_char_corpus(tmp_path_factory.mktemp("corpus"), max_docs=60)


@pytest.fixture(scope="module")
def tp_run(corpus, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("tp")
    config = _config(tmp, "tp", corpus, model_parallel_size=2, profile=True,
                     profile_step_start=PROFILE[0], profile_step_stop=PROFILE[1],
                     tensorboard_dir=str(tmp / "tb"), curriculum_learning=CURRICULUM,
                     char_level_ppl=True, eval_interval=3, eval_iters=1,
                     checkpoint_validation_with_forward_pass=True, save=str(tmp / "ckpt"),
                     save_interval=STEPS)
    ckpt = str(tmp / "ckpt" / f"global_step{STEPS}")
    direct = run_distributed(_train, 2, config, ckpt, timeout=240)[0]
    return {"tmp": tmp, "run": tmp / "tp", "config": config, "direct": direct}


def test_profile_traces_the_chosen_steps_only(tp_run):
    traced = _trace_iterations(tp_run["tmp"] / "tb")
    assert sorted(traced) == [0, 1]  # one trace per rank, in tensorboard_dir
    for iterations in traced.values():
        assert iterations == list(range(PROFILE[0] + 1, PROFILE[1] + 1))


def _check_stats(stats: dict[str, Any], train: dict[str, Any], direct: dict[str, float]):
    params = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("parameter_norms/")}
    assert set(params) == set(direct)
    for name, value in direct.items():
        assert params[name] == pytest.approx(value, rel=1e-5), name
    grads = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("gradient_norms/")}
    assert set(grads) == set(direct)
    # the per-parameter norms add up to the global gradient norm of the step
    total = math.sqrt(sum(v * v for v in grads.values()))
    assert total == pytest.approx(train["grad_norm"], rel=1e-4)
    zeros = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("pct_grad_zeros/")}
    assert set(zeros) == set(direct) and all(0.0 <= v <= 100.0 for v in zeros.values())
    # the character vocabulary is padded: unused rows of the word embedding get no gradient
    assert max(v for k, v in zeros.items() if "word_embeddings" in k) > 0.0
    return grads


def test_norm_logs_match_the_model_under_tensor_parallelism(tp_run):
    stats = {r["iteration"]: r for r in _records(tp_run["run"], "stats")}
    train = {r["iteration"]: r for r in _records(tp_run["run"], "train")}
    assert sorted(stats) == list(range(1, STEPS + 1))
    _check_stats(stats[STEPS], train[STEPS], tp_run["direct"])
    # after the first Adam step exp_avg = (1 - beta1) x gradient
    first = stats[1]
    grads = sorted(0.1 * v for k, v in first.items() if k.startswith("gradient_norms/"))
    moments = sorted(v for k, v in first.items()
                     if k.startswith("optimizer_state_norms/") and k.endswith("_exp_avg"))
    assert moments == pytest.approx(grads, rel=1e-4)
    assert any(k.endswith("_exp_avg_sq") for k in first)


def test_noise_scale_and_curriculum_are_logged_per_step(tp_run):
    train = {r["iteration"]: r for r in _records(tp_run["run"], "train")}
    # n_batches 2: the first estimate comes with step 2
    assert "noise_scale" not in train[1]
    assert all(math.isfinite(train[i]["noise_scale"]) for i in range(2, STEPS + 1))
    schedule = SeqlenCurriculum(CURRICULUM)
    want = {i: schedule.seqlen(i) for i in range(1, STEPS + 1)}
    assert want[1] < want[STEPS] == 64  # the schedule grows to the full length
    assert {i: r["curriculum_seqlen"] for i, r in train.items()} == want
    assert all(math.isfinite(r["lm_loss"]) for r in train.values())


def test_char_level_ppl_is_logged_with_evaluations(tp_run):
    evals = _records(tp_run["run"], "eval")
    assert evals
    for r in evals:  # one character per token: the character-level ppl is the ppl
        assert r["lm_loss_char_lvl_ppl"] == pytest.approx(r["eval_ppl"], rel=1e-6)


def test_checkpoint_validation_with_forward_pass_on_load(tp_run, corpus):
    tmp = tp_run["tmp"]
    common = {"model_parallel_size": 2, "load": str(tmp / "ckpt"),
              "checkpoint_validation_with_forward_pass": True}
    same = _config(tmp, "same", corpus, **common)
    assert run_distributed(_train, 2, same, timeout=240) == [None, None]
    assert "validated" in (tmp / "same" / "logs" / "run.log").read_text()
    # the same weights with rotary embeddings on half of each head instead of all of it: the
    # checkpoint loads (no weight changes shape) but the model computes something else
    other = _config(tmp, "other", corpus, **{**common, "rotary_pct": 0.5})
    errors = run_distributed(_train, 2, other, timeout=240)
    for error in errors:
        assert error is not None and "\n" not in error
        assert "checkpoint_validation_with_forward_pass" in error
        assert f"iteration {STEPS}" in error


def test_norm_logs_over_zero_partitions(corpus, tmp_path):
    config = _config(tmp_path, "zero", corpus, zero_optimization={"stage": 2},
                     train_iters=2, save=str(tmp_path / "ckpt"), save_interval=2)
    direct = run_distributed(_train, 2, config, str(tmp_path / "ckpt/global_step2"),
                             timeout=240)[0]
    stats = {r["iteration"]: r for r in _records(tmp_path / "zero", "stats")}
    train = {r["iteration"]: r for r in _records(tmp_path / "zero", "train")}
    _check_stats(stats[2], train[2], direct)


def test_norm_logs_noise_scale_and_curriculum_through_the_pipeline(corpus, tmp_path):
    config = _config(tmp_path, "pipe", corpus, pipe_parallel_size=2, gradient_clipping=1.0,
                     train_iters=3, curriculum_learning=CURRICULUM)
    assert run_distributed(_train, 2, config, timeout=240) == [None, None]
    stats = {r["iteration"]: r for r in _records(tmp_path / "pipe", "stats")}
    train = {r["iteration"]: r for r in _records(tmp_path / "pipe", "train")}
    grads = {k: v for k, v in stats[3].items() if k.startswith("gradient_norms/")}
    # both stages' parameters: 2 layers x 12 tensors, the embedding, the final norm's 2 and
    # the output layer
    assert len(grads) == 2 * 12 + 4
    assert math.sqrt(sum(v * v for v in grads.values())) == \
        pytest.approx(train[3]["grad_norm"], rel=1e-4)
    assert len([k for k in stats[3] if k.startswith("parameter_norms/")]) == len(grads)
    assert math.isfinite(train[3]["noise_scale"])
    schedule = SeqlenCurriculum(CURRICULUM)
    assert [train[i]["curriculum_seqlen"] for i in (1, 2, 3)] == \
        [schedule.seqlen(i) for i in (1, 2, 3)]


def test_tensorboard_tags_are_gpt_neox_names(tp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tp_run["tmp"] / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    name = "layers.0.attention.query_key_value.weight"
    for tag in (f"parameter_norms/{name}", f"gradient_norms/{name}", f"pct_grad_zeros/{name}",
                "optimizer_state_norms/0_exp_avg", "optimizer_state_norms/0_exp_avg_sq",
                "train/noise_scale", "train/curriculum_seqlen", "eval/lm_loss_char_lvl_ppl"):
        assert tag in tags, tag
    steps = [e.step for e in events.Scalars(f"parameter_norms/{name}")]
    assert steps == list(range(1, STEPS + 1))
