"""DPO, KTO and ORPO losses and their logged rewards against the ``trl`` library's, on the same
batch of log-probabilities (fp32); the RM loss, sequence log-probs and z-loss by definition."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import trl.experimental.orpo.orpo_trainer as trl_orpo
import trl.trainer.dpo_trainer as trl_dpo
import trl.trainer.kto_trainer as trl_kto

from megatron.parallel.state import ParallelState
from megatron.training import preference as P

TOL = 1e-6
B, S = 6, 9


class _Accel:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


def _outputs(per_token: torch.Tensor) -> SimpleNamespace:
    """What trl's trainers read from a model's output (log-probs of the labels per token)."""
    zeros = torch.zeros_like(per_token)
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                           is_top1=torch.zeros_like(per_token, dtype=torch.bool))


def _trainer_stub(beta: float, model_out: torch.Tensor, **extra) -> SimpleNamespace:
    model = SimpleNamespace(training=True)
    stub = SimpleNamespace(model=model, accelerator=_Accel(), beta=beta, ld_alpha=None,
                           aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                           _total_train_tokens=0, _tp_size=1, **extra)
    stub.model = model
    stub._model_out = model_out
    return stub


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    per_token = -torch.rand(2 * B, S - 1, generator=g, dtype=torch.float32) * 3
    mask = torch.zeros(2 * B, S, dtype=torch.long)
    for i in range(2 * B):
        mask[i, 2 + i % 3:] = 1  # prompts of 2-4 tokens
    per_token = per_token * mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * B, generator=g) * 0.7
    return {"per_token": per_token, "mask": mask, "ref": ref}


def test_dpo_matches_trl(batch):
    beta = 0.1
    per_token, mask, ref = batch["per_token"], batch["mask"], batch["ref"]
    stub = _trainer_stub(beta, per_token, precompute_ref_logps=True,
                         f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                         loss_weights=[1.0], label_smoothing=0.0, use_weighting=False)

    def model(**kwargs):
        return _outputs(per_token)

    inputs = {"input_ids": torch.zeros(2 * B, S, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, S, dtype=torch.long), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    expected = trl_dpo.DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}

    logps = per_token.sum(1)
    loss, metrics = P.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta)
    assert abs(float(loss) - float(expected)) < TOL
    assert abs(float(metrics["rewards_chosen"]) - logged["rewards/chosen"]) < TOL
    assert abs(float(metrics["rewards_rejected"]) - logged["rewards/rejected"]) < TOL
    assert abs(float(metrics["rewards_margin"]) - logged["rewards/margins"]) < TOL
    assert abs(float(metrics["rewards_accuracy"]) - logged["rewards/accuracies"]) < TOL
    assert 0.0 < logged["rewards/accuracies"] < 1.0  # the batch exercises both outcomes

    # reference-free DPO is DPO against a reference that gives every sequence log-prob 0
    zero = torch.zeros(B)
    free, _ = P.dpo_loss(logps[:B], logps[B:], None, None, beta=beta)
    against_zero, _ = P.dpo_loss(logps[:B], logps[B:], zero, zero, beta=beta)
    assert float(free) == float(against_zero)


def test_kto_matches_trl(batch):
    beta, dw, uw = 0.2, 1.3, 0.7
    per_token, mask, ref = batch["per_token"], batch["mask"], batch["ref"]
    desirable = torch.tensor([i % 3 != 0 for i in range(2 * B)])
    kl_per_token = per_token.roll(1, dims=0)
    ref_kl = ref.roll(1, dims=0) - 0.4
    stub = _trainer_stub(beta, per_token, precompute_ref_logps=True, calculate_KL=True,
                         loss_type="kto", desirable_weight=dw, undesirable_weight=uw)
    stub._compute_kl_logps = lambda m, b: trl_kto.KTOTrainer._compute_kl_logps(stub, m, b)

    def model(**kwargs):
        return _outputs(kl_per_token if "labels" in kwargs and kwargs["input_ids"] is
                        kl_ids else per_token)

    kl_ids = torch.ones(2 * B, S, dtype=torch.long)
    inputs = {"input_ids": torch.zeros(2 * B, S, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, S, dtype=torch.long), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": mask.roll(1, dims=0), "label": desirable,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    expected = trl_kto.KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    logged = {k: v[-1] for k, v in stub._metrics["train"].items()}

    kl = P.kto_kl(kl_per_token.sum(1), ref_kl)
    assert float(kl) > 0  # the clamp does not hide the term
    loss, metrics = P.kto_loss(per_token.sum(1), ref, desirable, kl, beta=beta,
                               desirable_weight=dw, undesirable_weight=uw)
    assert abs(float(loss) - float(expected)) < TOL
    assert abs(float(metrics["kl"]) - logged["kl"]) < TOL
    assert abs(float(metrics["rewards_chosen"]) - logged["rewards/chosen"]) < TOL
    assert abs(float(metrics["rewards_rejected"]) - logged["rewards/rejected"]) < TOL
    assert abs(float(metrics["rewards_margin"]) - logged["rewards/margins"]) < TOL


def test_orpo_matches_trl(batch):
    lam = 0.25
    per_token, mask = batch["per_token"], batch["mask"]
    counts = mask[:, 1:].sum(1).float()
    mean = per_token.sum(1) / counts
    nll = -per_token[:B].sum() / counts[:B].sum()
    stub = SimpleNamespace(beta=lam, accelerator=_Accel())
    losses, chosen_r, rejected_r, ratio, log_odds = trl_orpo.ORPOTrainer.odds_ratio_loss(
        stub, mean[:B], mean[B:])
    expected = nll - losses.mean()  # trl: policy_nll_loss - losses.mean()

    loss, metrics = P.orpo_loss(mean[:B], mean[B:], nll, lam=lam)
    assert abs(float(loss) - float(expected)) < TOL
    assert abs(float(metrics["rewards_chosen"]) - float(chosen_r.mean())) < TOL
    assert abs(float(metrics["rewards_rejected"]) - float(rejected_r.mean())) < TOL
    assert abs(float(metrics["rewards_margin"]) - float((chosen_r - rejected_r).mean())) < TOL
    assert abs(float(metrics["log_odds_ratio"]) - float(ratio)) < TOL
    assert abs(float(metrics["log_odds_chosen"]) - float(log_odds)) < TOL


def test_rm_loss_and_sequence_logps():
    g = torch.Generator().manual_seed(3)
    chosen, rejected = torch.randn(5, generator=g), torch.randn(5, generator=g)
    loss, metrics = P.rm_loss(chosen, rejected)
    expected = torch.log1p(torch.exp(-(chosen - rejected))).mean()
    assert abs(float(loss) - float(expected)) < TOL
    assert float(metrics["rewards_accuracy"]) == float((chosen > rejected).float().mean())

    logits = torch.randn(2, 4, 11, generator=g)
    labels = torch.randint(0, 11, (2, 4), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.float)
    state = ParallelState.single()
    got = P.sequence_logps(logits, labels, mask, state)
    ref = (F.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] * mask).sum(1)
    assert torch.allclose(got, ref, atol=1e-6)
    got_mean = P.sequence_logps(logits, labels, mask, state, average=True)
    assert torch.allclose(got_mean, ref / mask.sum(1), atol=1e-6)
    z = P.z_loss(logits, mask, state)
    assert abs(float(z) - float((torch.logsumexp(logits, -1) ** 2 * mask).sum() / 4)) < 1e-5
