"""LoRA: only the adapters train (the base weights stay bit-identical, the optimizer holds
the adapters only), merging gives the adapter model's logits, TP=2 and two pipeline stages
equal the plain model step by step,
and the exported PEFT adapter on the converted Hugging Face model gives our logits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from megatron.checkpoint.reshard import merge_tp_shards
from megatron.conversion.hf_mapping import hf_config, to_hf_state_dict
from megatron.model import GPTModel, gather_logits, lm_loss
from megatron.parallel import ParallelState, RankTopology
from megatron.training.lora import apply_lora, full_adapters, merged_state_dict, peft_adapter
from megatron.training.optimizers import param_groups
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import VOCAB, load_tiny

RANK, ALPHA = 4, 8.0
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
STEPS = 3


def _cfg():
    return load_tiny("tiny_neox", seq_length=16, max_position_embeddings=16)


def _lora_model(cfg, state: ParallelState) -> GPTModel:
    # one padded vocabulary for TP=1 and TP=2 (the same weights from the same seed)
    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=_cfg().tokenizer.padded_vocab_size,
                     state=state, init_seed=3)
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS, state=state,
               seed=9)
    return model


def _data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    return [(torch.randint(0, VOCAB, (2, 16), generator=g),
             torch.randint(0, VOCAB, (2, 16), generator=g)) for _ in range(steps)]


def _train(model: GPTModel, state: ParallelState) -> list[float]:
    optimizer = torch.optim.Adam([p for g in param_groups(model, 0.0) for p in g["params"]],
                                 lr=1e-2)
    losses = []
    for tokens, labels in _data():
        loss = lm_loss(model(tokens), labels, torch.ones(2, 16), state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def trained():
    cfg = _cfg()
    state = ParallelState.single()
    model = _lora_model(cfg, state)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train(model, state)
    return cfg, state, model, before, losses


def test_only_adapters_train(trained):
    cfg, state, model, before, losses = trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * cfg.model.num_layers
    in_optimizer = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    after = model.state_dict()
    for name, tensor in before.items():
        if ".lora_" in name:
            continue
        assert torch.equal(after[name], tensor), name  # bit-identical
    assert not torch.equal(after["layers.0.attention.query_key_value.lora_B"],
                           before["layers.0.attention.query_key_value.lora_B"])
    assert losses[-1] < losses[0]


def test_merged_model_equals_adapter_model(trained):
    cfg, state, model, _, _ = trained
    merged = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                      state=state)
    merged.load_state_dict(merged_state_dict(model.state_dict(), rank=RANK, alpha=ALPHA))
    tokens = _data(1)[0][0]
    with torch.no_grad():
        ours, plain = model(tokens), merged(tokens)
        base = GPTModel(cfg.model, cfg.act_ckpt, state=state, init_seed=3,
                        padded_vocab_size=cfg.tokenizer.padded_vocab_size)(tokens)
    assert (ours - base).abs().max() > 1e-3  # the adapters changed the model
    assert (ours - plain).abs().max() < 1e-5


def _tp2(rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    base = ParallelState.initialize(RankTopology(2, 2, 1))
    cfg = load_tiny("tiny_neox", world_size=2, model_parallel_size=2, seq_length=16,
                    max_position_embeddings=16)
    model = _lora_model(cfg, base)
    optimizer = torch.optim.Adam([p for g in param_groups(model, 0.0) for p in g["params"]],
                                 lr=1e-2)
    losses = []
    for tokens, labels in _data():
        loss = lm_loss(model(tokens), labels, torch.ones(2, 16), base)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tp2_lora_equals_tp1_per_step(trained):
    cfg, _, model, _, tp1 = trained
    results = run_distributed(_tp2, 2, timeout=240)
    for tp2, _ in results:
        assert_close(torch.tensor(tp2), torch.tensor(tp1), rtol=1e-5, atol=1e-6)
    # the two shards' adapters, put together, are the TP=1 adapters; merging shard by shard
    # gives the TP=1 merged weights
    shards = [sd for _, sd in results]
    ours = model.state_dict()
    for name, tensor in full_adapters(shards, cfg.model).items():
        assert_close(tensor, ours[name], rtol=1e-4, atol=1e-6)
    merged = merge_tp_shards([merged_state_dict(s, rank=RANK, alpha=ALPHA) for s in shards],
                             cfg.model)
    for name, tensor in merged_state_dict(ours, rank=RANK, alpha=ALPHA).items():
        assert_close(merged[name], tensor, rtol=1e-4, atol=1e-6)


def _pp2(rank: int, world: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    import deepspeed

    from megatron.model import build_pipeline_model, pipeline_key_to_model_key
    from megatron.model.pipeline import pipeline_to_model_state_dict

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    state = ParallelState.initialize(RankTopology(2, 1, 2))
    cfg = load_tiny("tiny_neox", world_size=2, pipe_parallel_size=2, seq_length=16,
                    max_position_embeddings=16)
    pipe = build_pipeline_model(cfg.model, cfg.act_ckpt, cfg.parallelism,
                                padded_vocab_size=_cfg().tokenizer.padded_vocab_size,
                                state=state, tracker=None, init_seed=3)
    adapted = apply_lora(pipe, rank=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS,
                         state=state, seed=9,
                         layer_name=lambda n: pipeline_key_to_model_key(n, cfg.model))
    assert adapted  # each stage adapts its own layers
    params = [p for g in param_groups(pipe, 0.0) for p in g["params"]]
    engine, *_ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.Adam(params, lr=1e-2),
        config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
                "steps_per_print": 10_000})
    positions = torch.arange(16).expand(2, 16)
    causal = torch.zeros(0, dtype=torch.bool)
    data = iter([((tokens, positions, causal), (labels, torch.ones(2, 16)))
                 for tokens, labels in _data()])
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(STEPS)]
    stage = pipeline_to_model_state_dict(pipe.state_dict(), cfg.model)
    return losses, {k: v.detach().clone() for k, v in stage.items()}


def test_pp2_lora_equals_plain_lora_per_step(trained):
    """Two pipeline stages train the same adapters as the plain model, step by step."""
    _, _, model, before, plain = trained
    results = run_distributed(_pp2, 2, timeout=240)
    ours = model.state_dict()
    stages = [sd for _, sd in results]
    assert not set(stages[0]) & set(stages[1])  # each stage holds its own layers
    for losses, _ in results:
        assert_close(torch.tensor(losses), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    names = {k for sd in stages for k in sd if ".lora_" in k}
    assert names == {k for k in ours if ".lora_" in k}
    for sd in stages:
        for name, tensor in sd.items():
            assert_close(tensor, ours[name], rtol=1e-4, atol=1e-6)
            if ".lora_" not in name:
                assert torch.equal(tensor, before[name]), name  # the base stays frozen


def test_peft_adapter_on_converted_model_gives_our_logits(trained, tmp_path):
    import peft
    import transformers

    cfg, state, model, _, _ = trained
    sd = model.state_dict()
    base_sd = {k: v for k, v in sd.items() if ".lora_" not in k}
    config = hf_config(cfg.model, "neox", vocab_size=cfg.tokenizer.padded_vocab_size,
                       special={}, dtype=torch.float32)
    from safetensors.torch import save_file

    hf_dir = tmp_path / "hf"
    config.save_pretrained(str(hf_dir))
    save_file(to_hf_state_dict(base_sd, cfg.model, "neox"), str(hf_dir / "model.safetensors"))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf.eval()
    tokens = _data(1)[0][0]
    with torch.no_grad():
        base_logits = hf(input_ids=tokens).logits
    adapter = peft_adapter(sd, tmp_path / "adapter", rank=RANK, alpha=ALPHA, dropout=0.0,
                           targets=TARGETS)
    with_adapter = peft.PeftModel.from_pretrained(hf, str(adapter))
    with_adapter.eval()
    with torch.no_grad():
        ours = gather_logits(model(tokens), state)
        theirs = with_adapter(input_ids=tokens).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter is what makes them agree
    assert (ours - theirs).abs().max() < 1e-4
