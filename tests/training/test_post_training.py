"""Post-training methods learn the synthetic preference task of the bundled corpus (prefer the
real continuation of a prompt over its characters shuffled), in process on one rank with a
tiny model: DPO raises the margin and held-out accuracy; a reward model ranks held-out
pairs; SFT on chat data leaves the user turns untrained."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron.data.pairwise_dataset import build_post_training_datasets
from megatron.data.preprocess.post_training import ChatTemplate, chat_tokens
from megatron.model import GPTModel
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.parallel import ParallelState
from megatron.tokenizer import build_tokenizer
from megatron.training.data_setup import PreferenceBatch, preference_batch
from megatron.training.post_training import (
    Objective,
    attach_reward_head,
    frozen,
    precompute_reference_logps,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from posttrain_helpers import CHATML, pairwise_values, write_pairwise  # noqa: E402

SEQ = 48  # prompt 20 + completion 20 + eod
PAIRS_TRAIN, PAIRS_VALID = 3000, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: extra intra-op threads only add overhead on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pairs")
    return pairwise_values(write_pairwise(d, "train", PAIRS_TRAIN, 11),
                           write_pairwise(d, "valid", PAIRS_VALID, 12))


def _config(**values: Any):
    base = {"num_layers": 2, "hidden_size": 48, "num_attention_heads": 4, "seq_length": SEQ,
            "max_position_embeddings": SEQ, "train_micro_batch_size_per_gpu": 16,
            "tokenizer_type": "CharLevelTokenizer", "make_vocab_size_divisible_by": 8,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "pos_emb": "rotary",
            "norm": "layernorm", "no_weight_tying": True}
    merged = merge_configs([("test", {**base, **values})])
    cfg = resolve_config(merged, RunFacts(world_size=1, launching=False, purpose=None))
    return cfg.with_vocab_size(build_tokenizer("CharLevelTokenizer").vocab_size)


def _model(cfg, state) -> GPTModel:
    return GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                    state=state, init_seed=5)


def _batches(dataset, cfg, size: int):
    eod = build_tokenizer("CharLevelTokenizer").eod
    loader = torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)
    for raw in loader:
        yield preference_batch(raw, cfg, eod, torch.device("cpu"))


def _train(impl: str, pairs: dict[str, Any], steps: int, lr: float,
           start: GPTModel | None = None, seq: int = SEQ, valid_pairs: int = PAIRS_VALID,
           **extra: Any):
    """Train ``steps`` micro batches of 16 (from ``start``'s weights if given); returns the
    model, the train values per step and the held-out values before and after."""
    cfg = _config(train_impl=impl, seq_length=seq, max_position_embeddings=seq, **pairs,
                  **extra)
    state = ParallelState.single()
    model = _model(cfg, state)
    if start is not None:
        model.load_state_dict(start.state_dict())
    if impl == "rm":
        torch.manual_seed(0)
        attach_reward_head(model, cfg)
    reference = None
    if impl == "dpo":
        reference = frozen(_model(cfg, state))
        reference.load_state_dict(model.state_dict())
    objective = Objective(cfg, state, reference)
    train, valid, _ = build_post_training_datasets(
        cfg.data, cfg.posttrain, seq_length=seq, seed=3,
        train_val_test_num_samples=[steps * 16, valid_pairs, 0])

    def held_out() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            batch = next(_batches(valid, cfg, valid_pairs))  # every held-out pair once
            _, metrics = objective.loss(model, batch)
        model.train()
        return {k: float(v) for k, v in metrics.items()}

    before = held_out() if impl != "normal" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for batch in _batches(train, cfg, 16):
        if impl == "normal":  # SFT on the chosen side only
            batch = PreferenceBatch(tokens=batch.tokens[:16], labels=batch.labels[:16],
                                    loss_mask=batch.loss_mask[:16], attention_mask=None,
                                    position_ids=batch.position_ids[:16])
        loss, metrics = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"loss": float(loss.detach()),
                        **{k: float(v) for k, v in metrics.items()}})
    return model, history, before, held_out() if impl != "normal" else {}


def test_dpo_raises_margin_and_held_out_accuracy(pairs):
    _, history, before, after = _train("dpo", pairs, steps=40, lr=3e-3, dpo_beta=0.1)
    # the policy starts as the reference: every reward is 0, no pair is ranked right
    assert before["rewards_margin"] == 0.0 and before["rewards_accuracy"] == 0.0
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    first = sum(h["rewards_margin"] for h in history[:5]) / 5
    last = sum(h["rewards_margin"] for h in history[-5:]) / 5
    assert last > first + 0.5, (first, last)
    assert after["rewards_margin"] > 0.5
    assert after["rewards_accuracy"] > 0.8, after


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory) -> dict[str, Any]:
    """Real 16-character snippets over their characters shuffled, without a prompt: the
    reward is read at one position (GPT-NeoX's reward), whose attention must gather the whole
    text; short texts let the tiny model learn that within the test's few hundred steps."""
    d = tmp_path_factory.mktemp("short_pairs")
    chars = {"prompt_chars": 0, "completion_chars": 16}
    return pairwise_values(write_pairwise(d, "train", 8000, 11, **chars),
                           write_pairwise(d, "valid", 128, 12, **chars))


def test_reward_model_ranks_held_out_pairs(short_pairs):
    # as usual for reward models, start from a language model fine-tuned on the chosen side
    common = {"seq": 20, "valid_pairs": 128}
    sft, sft_history, _, _ = _train("normal", short_pairs, steps=80, lr=3e-3, **common)
    assert sft_history[-1]["loss"] < sft_history[0]["loss"] - 1.0
    _, history, before, after = _train("rm", short_pairs, steps=300, lr=1e-3, start=sft,
                                       **common)
    assert before["rewards_accuracy"] < 0.9  # the head starts untrained
    first = sum(h["loss"] for h in history[:10]) / 10
    last = sum(h["loss"] for h in history[-10:]) / 10
    assert last < first - 0.2, (first, last)
    assert after["rewards_accuracy"] > 0.9, after


def test_sft_on_chat_data_leaves_user_turns_untrained():
    tok = build_tokenizer("CharLevelTokenizer")
    template = ChatTemplate("test", CHATML)
    chats = [[{"role": "user", "content": "name a keyword"},
              {"role": "assistant", "content": "lambda"},
              {"role": "user", "content": "another one"},
              {"role": "assistant", "content": "yield"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello there"}]]
    seq = 96
    texts, labels = [], []
    for chat in chats:
        t, lab = chat_tokens(chat, template, tok, append_eod=True)
        pad = seq + 1 - len(t)
        texts.append(t + [0] * pad)
        labels.append(lab + [-100] * pad)
    cfg = _config(seq_length=seq, max_position_embeddings=seq)
    raw = {"text": torch.tensor(texts), "label": torch.tensor(labels)}
    batch = preference_batch(raw, cfg, tok.eod, torch.device("cpu"))
    state = ParallelState.single()
    model = _model(cfg, state)
    captured = {}

    def forward(tokens, **kwargs):
        logits = model(tokens, **kwargs)
        logits.retain_grad()
        captured["logits"] = logits
        return logits

    loss, _ = Objective(cfg, state).loss(forward, batch)
    loss.backward()
    grad = captured["logits"].grad
    untrained = batch.loss_mask == 0
    # the positions that predict user, system and template tokens get no gradient at all
    assert untrained.sum() > 0 and (grad[untrained] == 0).all()
    per_position = grad.abs().sum(-1)
    assert (per_position[~untrained] > 0).all()
    # and what is trained is exactly the assistant text
    trained_targets = batch.labels[batch.loss_mask > 0].tolist()
    text = tok.detokenize([t for t in trained_targets if t != tok.eod])
    assert "lambda" in text and "yield" in text and "hello there" in text
    assert "keyword" not in text and "be brief" not in text and "hi" not in text.replace(
        "hello there", "")


def test_precomputed_reference_equals_the_frozen_copy(tmp_path):
    data = pairwise_values(write_pairwise(tmp_path, "train", 24, 31),
                           write_pairwise(tmp_path, "valid", 8, 32))
    cfg = _config(train_impl="dpo", precompute_model_name="start", **data)
    state = ParallelState.single()
    start = frozen(_model(cfg, state))
    eod = build_tokenizer("CharLevelTokenizer").eod
    written = precompute_reference_logps(start, cfg, state, eod, torch.device("cpu"),
                                         write=True, log=lambda _: None)
    assert written[0] == data["pos_train_data_paths"][0] + "_start_ref"
    assert len(written) == 4  # chosen and rejected of train and valid
    train, _, _ = build_post_training_datasets(
        cfg.data, cfg.posttrain, seq_length=SEQ, seed=3, train_val_test_num_samples=[24, 8, 0])
    batch = next(_batches(train, cfg, 12))
    assert batch.ref_logps is not None and batch.ref_logps.shape == (24,)
    policy = _model(cfg, state)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg_live = _config(train_impl="dpo", **data)
    live = Objective(cfg_live, state, start)
    stored = Objective(cfg, state)
    loss_live, m_live = live.loss(policy, dataclasses.replace(batch, ref_logps=None))
    loss_stored, m_stored = stored.loss(policy, batch)
    assert float(m_live["rewards_margin"]) != 0.0
    assert abs(float(loss_live.detach()) - float(loss_stored.detach())) < 1e-6
    for k in ("rewards_chosen", "rewards_rejected", "kl_chosen"):
        assert abs(float(m_live[k]) - float(m_stored[k])) < 1e-6


def test_reward_read_position_and_z_loss_are_gpt_neox_s(pairs):
    """rm: the reward is the head's value at the last trained position; with z_loss the loss
    adds z_loss * mean(r_chosen^2 + r_rejected^2)."""
    state = ParallelState.single()
    cfg, plain = _config(train_impl="rm", z_loss=0.5, **pairs), _config(train_impl="rm", **pairs)
    model = _model(cfg, state)
    torch.manual_seed(0)
    attach_reward_head(model, cfg)
    train, _, _ = build_post_training_datasets(
        cfg.data, cfg.posttrain, seq_length=SEQ, seed=3, train_val_test_num_samples=[8, 8, 0])
    batch = next(_batches(train, cfg, 4))
    with torch.no_grad():
        loss, metrics = Objective(cfg, state).loss(model, batch)
        base, base_metrics = Objective(plain, state).loss(model, batch)
        hidden = model(batch.tokens, hidden_only=True, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask)
    rows = torch.arange(8)
    last = (batch.loss_mask > 0).float().cumsum(-1).argmax(-1)  # the last trained position
    rewards = model.reward_head(hidden[rows, last])
    # the reward is read where the last labelled token (the end of document) is predicted
    assert float((rewards[:4] - rewards[4:]).mean()) == pytest.approx(
        float(base_metrics["rewards_margin"]), rel=1e-5, abs=1e-6)
    z = (rewards[:4].square() + rewards[4:].square()).mean()
    assert float(metrics["z_loss"]) == pytest.approx(float(z), rel=1e-5)
    assert float(loss) == pytest.approx(float(base) + 0.5 * float(z), rel=1e-5)
    assert float(z) > 0


def test_objective_keys_reach_the_losses(pairs):
    """dpo_reference_free (no reference model is asked for), kto_desirable_weight /
    kto_undesirable_weight / kto_fp32 and rm_pooling: mean, each against the loss computed
    directly from the model's log-probabilities or rewards."""
    from megatron.training import preference as P

    state = ParallelState.single()
    dpo = _config(train_impl="dpo", dpo_reference_free=True, dpo_beta=0.3, **pairs)
    model = _model(dpo, state)
    train, _, _ = build_post_training_datasets(
        dpo.data, dpo.posttrain, seq_length=SEQ, seed=3, train_val_test_num_samples=[8, 8, 0])
    batch = next(_batches(train, dpo, 4))
    with torch.no_grad():
        logits = model(batch.tokens, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask)
        logps = P.sequence_logps(logits, batch.labels, batch.loss_mask, state)
        loss, _ = Objective(dpo, state, reference=None).loss(model, batch)
        want, _ = P.dpo_loss(logps[:4], logps[4:], None, None, beta=0.3)
        assert float(loss) == pytest.approx(float(want), rel=1e-6)

        weights = {"kto_desirable_weight": 2.0, "kto_undesirable_weight": 0.5}
        kto = _config(train_impl="kto", kto_fp32=True, kto_beta=0.2, **weights, **pairs)
        ref = logps.flip(0) - 0.1  # precomputed reference log-probabilities
        desirable = torch.tensor([True, False] * 4)
        kbatch = dataclasses.replace(batch, paired=False, desirable=desirable, ref_logps=ref)
        loss, _ = Objective(kto, state).loss(model, kbatch)
        want, _ = P.kto_loss(logps, ref, desirable, P.kto_kl(logps, ref), beta=0.2,
                             desirable_weight=2.0, undesirable_weight=0.5)
        assert float(loss) == pytest.approx(float(want), rel=1e-6)
        unweighted, _ = Objective(_config(train_impl="kto", kto_beta=0.2, **pairs),
                                  state).loss(model, kbatch)
        assert float(unweighted) != pytest.approx(float(loss), rel=1e-3)

        rm = _config(train_impl="rm", rm_pooling="mean", **pairs)
        torch.manual_seed(0)
        attach_reward_head(model, rm)
        _, metrics = Objective(rm, state).loss(model, batch)
        hidden = model(batch.tokens, hidden_only=True, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask)
        mask = batch.loss_mask.float()
        rewards = (model.reward_head(hidden) * mask).sum(-1) / mask.sum(-1)
        assert float(metrics["rewards_margin"]) == pytest.approx(
            float((rewards[:4] - rewards[4:]).mean()), rel=1e-5, abs=1e-6)
