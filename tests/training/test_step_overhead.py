"""The trainer's per-step pieces that replace DeepSpeed's: the fused gradient-norm pass, the
global-norm clipper, the deferred loss checks of the step guard, the causal mask left out of
the batch, and the per-node rank count used to split CPU threads."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron.data.masks import prepare_lm_batch
from megatron.parallel.state import ParallelState
from megatron.runtime.distributed import local_world_size
from megatron.training.control import StepGuard, grad_norms
from megatron.training.engine_setup import _single_replica_reduction_is_identity
from megatron.training.grad_norm import NormClipper, check_grads


def _model_with_grads(seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    loss = model(torch.randn(5, 8)).pow(2).sum() * scale
    loss.backward()
    return model


def test_grad_norms_match_per_tensor_norms_and_accumulate_bf16_in_fp32():
    grads = [torch.randn(7, 3), torch.randn(11)]
    expected = torch.stack([g.norm() for g in grads])
    torch.testing.assert_close(grad_norms(grads), expected)
    # 300 values of 1 in bf16: an fp32 accumulation gives sqrt(300) exactly enough
    bf = [torch.ones(300, dtype=torch.bfloat16), torch.full((4,), 2.0, dtype=torch.bfloat16)]
    norms = grad_norms(bf)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([math.sqrt(300.0), 4.0]))


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # clipped, and left alone (norm below max)
def test_norm_clipper_matches_torch_clip_grad_norm(scale):
    ours = _model_with_grads(scale=scale)
    ref = _model_with_grads(scale=scale)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    clipper = NormClipper(ours, ParallelState.single(), max_norm=0.5)
    assert clipper.measure() is True
    norm = clipper()
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    assert clipper.last_norm == norm
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)
    if scale < 1.0:
        assert float(ref_norm) < 0.5  # the case where nothing may change


def test_norm_clipper_without_measure_computes_the_norm_at_the_update():
    ours = _model_with_grads()
    ref = _model_with_grads()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.25)
    clipper = NormClipper(ours, ParallelState.single(), max_norm=0.25)
    assert clipper() == pytest.approx(float(ref_norm), rel=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8)


def test_non_finite_gradient_gives_a_false_verdict_and_no_clipping():
    model = _model_with_grads()
    first = next(model.parameters())
    first.grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in model.parameters()]
    finite, norm = check_grads(model.parameters(), ParallelState.single(), global_norm=True)
    assert finite is False and not math.isfinite(norm)
    clipper = NormClipper(model, ParallelState.single(), max_norm=0.5)
    assert clipper.measure() is False
    assert not math.isfinite(clipper())
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, b)  # a skipped step must not rescale anything


def test_step_guard_reads_deferred_loss_checks_at_decide():
    guard = StepGuard(max_consecutive=10, group=None)
    guard.note_loss(torch.tensor(1.0))
    guard.note_loss(torch.tensor(float("nan")))
    assert guard.decide(grads_finite=True) is True  # a bad micro batch skips the step
    guard.stepped = True
    assert guard.end_step() is True
    guard.note_loss(torch.tensor(2.0))
    assert guard.decide(grads_finite=True) is False
    guard.stepped = True
    assert guard.end_step() is False
    guard.note_loss(torch.tensor(2.0))
    assert guard.decide(grads_finite=False) is True  # bad gradients alone skip too


def test_causal_mask_is_left_out_unless_documents_need_their_own():
    text = torch.tensor([[5, 6, 0, 7, 8, 9], [1, 2, 3, 0, 4, 5]])
    full = prepare_lm_batch({"text": text}, eod_token=0)
    lean = prepare_lm_batch({"text": text}, eod_token=0, causal_attention_mask=False)
    assert lean[3] is None and full[3] is not None
    for a, b in zip(full[:3] + full[4:], lean[:3] + lean[4:], strict=True):
        assert torch.equal(a, b)
    reset = prepare_lm_batch({"text": text}, eod_token=0, reset_attention_mask=True,
                             causal_attention_mask=False)
    ref = prepare_lm_batch({"text": text}, eod_token=0, reset_attention_mask=True)
    assert torch.equal(reset[3], ref[3])


@pytest.mark.parametrize(("env", "expected"), [
    ({"LOCAL_WORLD_SIZE": "3", "LOCAL_SIZE": "5", "WORLD_SIZE": "8"}, 3),
    ({"LOCAL_SIZE": "4", "WORLD_SIZE": "8"}, 4),
    ({"WORLD_SIZE": "8", "NNODES": "2"}, 4),
    ({"WORLD_SIZE": "6", "CROSS_SIZE": "3"}, 2),
    ({}, 1),
])
def test_local_world_size_from_launcher_variables(monkeypatch, env, expected):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE", "NNODES", "CROSS_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert local_world_size() == expected


def _engine(dp: int = 1, predivide: float = 1.0, comm: torch.dtype = torch.float32):
    return SimpleNamespace(dp_world_size=dp, communication_data_type=comm,
                           gradient_predivide_factor=lambda: predivide)


def _cfg(precision: str, gas: int = 1):
    return SimpleNamespace(precision=SimpleNamespace(precision=precision),
                           training=SimpleNamespace(gradient_accumulation_steps=gas))


def test_backward_allreduce_is_dropped_only_when_it_is_an_identity():
    single = ParallelState.single()
    assert _single_replica_reduction_is_identity(_engine(), _cfg("fp32"), 0, False, single)
    # anything that makes the reduction do real work keeps it
    assert not _single_replica_reduction_is_identity(_engine(), _cfg("fp32"), 1, False, single)
    assert not _single_replica_reduction_is_identity(_engine(), _cfg("fp32"), 0, True, single)
    assert not _single_replica_reduction_is_identity(_engine(dp=2), _cfg("fp32"), 0, False,
                                                     single)
    assert not _single_replica_reduction_is_identity(_engine(predivide=2.0), _cfg("fp32"), 0,
                                                     False, single)
    assert not _single_replica_reduction_is_identity(_engine(comm=torch.float16), _cfg("fp32"),
                                                     0, False, single)
    # bf16: a bf16 round trip is exact for one micro batch's gradient, not for a sum of several
    bf16 = _engine(comm=torch.bfloat16)
    assert _single_replica_reduction_is_identity(bf16, _cfg("bfloat16", gas=1), 0, False, single)
    assert not _single_replica_reduction_is_identity(bf16, _cfg("bfloat16", gas=4), 0, False,
                                                     single)
    assert not _single_replica_reduction_is_identity(_engine(), _cfg("fp16"), 0, False, single)
