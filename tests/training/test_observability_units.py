"""The observability keys' validation, the gradient-noise-scale estimator on a known setup, the
profiler window and the curriculum's batch cut (no training run)."""

from __future__ import annotations

import pytest
import torch

from megatron.neox_arguments import ConfigError
from megatron.parallel.state import ParallelState
from megatron.training.curriculum import SeqlenCurriculum, truncate
from megatron.training.data_setup import LMBatch
from megatron.training.noise_scale import GradientNoiseScale, noise_and_scale
from tests.config.cfg_helpers import make_cfg


def err(**overrides) -> str:
    with pytest.raises(ConfigError) as info:
        make_cfg(**overrides)
    return str(info.value)


def test_memory_profiling_is_refused_on_cpu_ranks_and_accepted_on_gpus():
    msg = err(memory_profiling=True, memory_profiling_path="snap", launching=True)
    assert msg.startswith("a.yml: memory_profiling: ") and "CUDA" in msg and "\n" not in msg
    cfg = make_cfg(memory_profiling=True, memory_profiling_path="snap", launching=False)
    assert any("memory_profiling" in w for w in cfg.warnings)  # a dry run plans for elsewhere
    cfg = make_cfg(memory_profiling=True, memory_profiling_path="snap", gpu=True)
    assert cfg.logging.memory_profiling and not any("memory_profiling" in w
                                                    for w in cfg.warnings)
    assert "memory_profiling_path" in err(memory_profiling=True, gpu=True)


def test_profile_window_and_trace_directory_are_checked():
    assert "profile_step_stop" in err(profile=True, log_dir="logs", profile_step_start=5,
                                      profile_step_stop=5)
    assert "tensorboard_dir" in err(profile=True)
    cfg = make_cfg(profile=True, tensorboard_dir="tb", profile_step_start=1, profile_step_stop=3)
    assert (cfg.logging.profile, cfg.logging.profile_step_stop) == (True, 3)


def test_per_parameter_logs_are_accepted_and_forward_validation_needs_the_plain_model():
    for name in ("log_param_norm", "log_grad_norm", "log_grad_pct_zeros",
                 "log_optimizer_states", "log_gradient_noise_scale"):
        for pipe in (0, 1):
            assert getattr(make_cfg(**{name: True, "pipe_parallel_size": pipe}).logging, name)
    name = "checkpoint_validation_with_forward_pass"
    msg = err(**{name: True, "pipe_parallel_size": 1})
    assert msg.startswith(f"a.yml: {name}") and "pipe_parallel_size: 0" in msg
    assert make_cfg(**{name: True}).checkpoint.checkpoint_validation_with_forward_pass
    assert "at least 2" in err(log_gradient_noise_scale=True, gradient_noise_scale_n_batches=1)
    cfg = make_cfg(log_gradient_noise_scale=True, gradient_noise_scale_cpu_offload=True,
                   char_level_ppl=True)
    assert cfg.logging.gradient_noise_scale_cpu_offload and cfg.logging.char_level_ppl


def test_curriculum_block_is_checked_and_curriculum_seqlen_is_not_a_setting():
    block = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8,
             "max_difficulty": 32, "schedule_type": "fixed_linear",
             "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}
    assert make_cfg(curriculum_learning=block).ds.curriculum_learning == block
    assert "longer than seq_length" in err(curriculum_learning={**block, "max_difficulty": 64})
    assert "only 'seqlen'" in err(curriculum_learning={**block, "curriculum_type": "vocab"})
    msg = err(curriculum_learning={k: v for k, v in block.items() if k != "min_difficulty"})
    assert msg.startswith("a.yml: curriculum_learning: ") and "min_difficulty" in msg
    assert "curriculum_seqlen" in err(curriculum_seqlen=16)


def test_curriculum_schedule_and_batch_cut():
    block = {"curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 32,
             "schedule_type": "fixed_linear",
             "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 8}}
    lengths = [SeqlenCurriculum(block).seqlen(i) for i in range(1, 7)]
    assert lengths == sorted(lengths) and lengths[0] == 8 and lengths[-1] == 32
    tokens = torch.arange(64).reshape(2, 32)
    batch = LMBatch(tokens=tokens, labels=tokens + 1, loss_mask=torch.ones(2, 32),
                    attention_mask=torch.ones(2, 1, 32, 32, dtype=torch.bool),
                    position_ids=torch.arange(32).repeat(2, 1))
    cut = truncate(batch, 16)
    assert torch.equal(cut.tokens, tokens[:, :16]) and torch.equal(cut.labels, tokens[:, 1:17])
    assert cut.attention_mask.shape == (2, 1, 16, 16) and cut.position_ids.shape == (2, 16)
    assert truncate(batch, 32) is batch


def test_noise_scale_estimates_are_unbiased():
    # |G_B|^2 = |G|^2 + tr(Sigma) / B in expectation: exact inputs give the exact values
    g2, trace = 3.0, 40.0
    true_sq, tr = noise_and_scale(g2 + trace / 4, g2 + trace / 20, 4, 20)
    assert (true_sq, tr) == (pytest.approx(g2), pytest.approx(trace))


def test_noise_scale_of_simulated_gradients():
    """Per-example gradients G + noise with covariance sigma^2 I in d dimensions: the noise
    scale B_simple = tr(Sigma) / |G|^2 = d sigma^2 / |G|^2."""
    gen = torch.Generator().manual_seed(0)
    d, sigma, batch = 2000, 0.5, 8
    true = torch.randn(d, generator=gen) * 0.2
    want = d * sigma ** 2 / float(true.pow(2).sum())
    params = [torch.nn.Parameter(torch.zeros(d))]
    est = GradientNoiseScale(ParallelState.single(), batch, n_batches=4, beta=0.9)
    for _ in range(400):  # the mean of `batch` per-example gradients per step
        grad = true + sigma * torch.randn(d, generator=gen) / batch ** 0.5
        est.update(params, [grad])
    assert est.estimates == 100
    assert est.noise_scale == pytest.approx(want, rel=0.15)
    offloaded = GradientNoiseScale(ParallelState.single(), batch, n_batches=4, cpu_offload=True)
    offloaded.update(params, [true])
    assert offloaded.buffer is not None and offloaded.buffer[0].device.type == "cpu"
