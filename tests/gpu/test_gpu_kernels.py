"""GPU kernels against their reference paths, in one process: flash / memory-efficient SDPA
against the math path, fused AdamW against the unfused one, generation with the KV cache
against full recomputation, and the Hugging Face parity check on the GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from gpu_helpers import record
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron.model import GPTModel, lm_loss
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.parallel import ParallelState
from megatron.training.optimizers import build_optimizer, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "conversion"))

DEVICE = torch.device("cuda")
VOCAB = 512


def _config(**overrides):
    values = {"num_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "seq_length": 128,
              "pos_emb": "rotary", "make_vocab_size_divisible_by": 64,
              "tokenizer_type": "CharLevelTokenizer", "train_micro_batch_size_per_gpu": 4,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **overrides}
    merged = merge_configs([("gpu-test", values)])
    return resolve_config(merged, RunFacts(purpose=None, launching=False)).with_vocab_size(VOCAB)


def _model(cfg, dtype=torch.bfloat16, seed=0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                     state=ParallelState.single())
    return model.to(device=DEVICE, dtype=dtype)


def _tokens(batch=4, seq=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(DEVICE)


@pytest.mark.parametrize("backend", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                         ids=["flash", "efficient"])
def test_fused_attention_matches_math(backend):
    model = _model(_config()).eval()
    tokens = _tokens()
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            ref = model(tokens).float()
        with sdpa_kernel([backend]):  # only this kernel: an unusable kernel raises
            got = model(tokens).float()
    diff = (got - ref).abs().max().item()
    record(f"sdpa_{backend.name.lower()}_vs_math", max_abs_logit_diff=diff,
           logit_scale=ref.abs().max().item())
    assert diff < 3e-2 * max(1.0, ref.abs().max().item())


def _train_steps(fused: bool, steps: int = 5) -> list[torch.Tensor]:
    cfg = _config()
    model = _model(cfg, dtype=torch.float32)
    groups = param_groups(model, cfg.optim.weight_decay)
    built = build_optimizer(cfg.optim, groups)
    optimizer = built.optimizer
    # the builder picks the fused kernel on GPUs; the reference is the single-tensor loop
    for group in optimizer.param_groups:
        group.update(fused=fused, foreach=False)
    labels = _tokens(seed=2)
    mask = torch.ones_like(labels, dtype=torch.float32)
    for step in range(steps):
        loss = lm_loss(model(_tokens(seed=10 + step)), labels, mask, ParallelState.single())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_builder_picks_fused_adamw_on_gpu():
    cfg = _config()
    built = build_optimizer(cfg.optim, param_groups(_model(cfg, torch.float32),
                                                    cfg.optim.weight_decay))
    assert built.optimizer.defaults.get("fused") is True


def test_fused_adamw_matches_unfused():
    fused, plain = _train_steps(True), _train_steps(False)
    diff = max((a - b).abs().max().item() for a, b in zip(fused, plain))
    moved = max((a - b).abs().max().item() for a, b in zip(plain, _initial_params()))
    record("fused_adamw_vs_unfused", max_abs_param_diff=diff, max_update=moved)
    assert moved > 1e-4  # the steps did something
    assert diff < 1e-5


def _initial_params() -> list[torch.Tensor]:
    return [p.detach() for p in _model(_config(), dtype=torch.float32).parameters()]


@torch.no_grad()
def test_kv_cache_generation_matches_recompute():
    """Greedy generation with the KV cache (the prompt once, then one token at a time); the
    logits of every step must equal those of one full forward over the generated sequence
    (fp32, so that no near-tie decides the comparison)."""
    model = _model(_config(), dtype=torch.float32).eval()
    prompt = _tokens(batch=1, seq=16)
    new_tokens = 24
    cache = model.new_kv_cache(1, max_length=prompt.shape[1] + new_tokens)
    steps = [model(prompt, kv_cache=cache)[:, -1]]
    seq = prompt
    for _ in range(new_tokens):
        nxt = steps[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        steps.append(model(nxt, kv_cache=cache)[:, -1])
    cached = torch.stack(steps, dim=1)[0]  # [new_tokens + 1, vocab]
    full = model(seq)[0, prompt.shape[1] - 1:]  # the same positions without the cache
    diff = (cached - full).abs().max().item()
    record("kv_cache_generation", max_abs_logit_diff=diff, tokens=new_tokens)
    assert cached.shape == full.shape
    assert diff < 1e-3 * max(1.0, full.abs().max().item())
    assert torch.equal(full[:-1].argmax(-1), seq[0, prompt.shape[1]:])  # greedy throughout


def test_hf_parity_on_gpu(tmp_path):
    from conversion_helpers import (
        load_hf,
        neox_config,
        random_tokens,
        tiny_hf_model,
        tokenizer_size,
        train_tokenizer,
    )

    from megatron.checkpoint.weights import read_model_state_dict
    from megatron.conversion import hf_to_neox

    tok = train_tokenizer(tmp_path / "tok")
    n = tokenizer_size(tok)
    worst = 0.0
    for kind, extra in (("gpt_neox", {"use_parallel_residual": True}),
                        ("llama", {"num_key_value_heads": 2})):
        hf_dir = tiny_hf_model(kind, tmp_path / kind, tok, vocab_size=-(-n // 64) * 64, seed=0,
                               **extra)
        out = tmp_path / f"neox_{kind}"
        hf_to_neox.convert(str(hf_dir), str(out), tp=1, pp=0)
        cfg = neox_config([out / "neox_config.yml"])
        state, _ = read_model_state_dict(out, cfg.model)
        vocab = int(state["embed.word_embeddings.weight"].shape[0])
        ours = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=vocab,
                        state=ParallelState.single())
        ours.load_state_dict(state)
        ours = ours.to(DEVICE).eval()
        theirs = load_hf(hf_dir).to(DEVICE)
        tokens = random_tokens(n).to(DEVICE)
        with torch.no_grad():
            a = ours(tokens).float()[..., : theirs.config.vocab_size]
            b = theirs(tokens).logits.float()
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        assert b.abs().max() > 1.0
        assert diff < 1e-3, (kind, diff)  # fp32 on the GPU (TF32 off by default in torch)
    record("hf_parity_gpu", max_abs_logit_diff=worst)
