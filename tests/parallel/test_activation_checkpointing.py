"""Activation checkpointing through DeepSpeed's module: the same training losses with and
without each of partition_activations, checkpoint_in_cpu, contiguous_checkpointing,
synchronize_each_layer and profile_backward, on 2 gloo ranks with tensor parallelism 2 and
dropout on, and what DeepSpeed keeps for the backward pass in each case."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch

from megatron.model.gpt import lm_loss
from megatron.neox_arguments import padded_vocab_size
from megatron.parallel import ParallelState, RankTopology, model_parallel_seed
from megatron.parallel.activation_checkpointing import (
    CheckpointSettings,
    checkpoint_settings,
    current_settings,
)
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import batch, build, make_config

STEPS = 3
DROPOUT = {"attention_dropout": 0.2, "hidden_dropout": 0.2}
# name -> config keys (on top of a 3-layer TP=2 model with dropout)
VARIANTS: dict[str, dict[str, Any]] = {
    "no checkpointing": {},
    "checkpoint_activations": {"checkpoint_activations": True},
    "checkpoint_num_layers 2": {"checkpoint_activations": True, "checkpoint_num_layers": 2},
    "partition_activations": {"checkpoint_activations": True, "partition_activations": True},
    "distribute_checkpointed_activations": {"checkpoint_activations": True,
                                            "distribute_checkpointed_activations": True},
    "partition + checkpoint_in_cpu": {"checkpoint_activations": True,
                                      "partition_activations": True, "checkpoint_in_cpu": True},
    "partition + contiguous_checkpointing": {"checkpoint_activations": True,
                                             "partition_activations": True,
                                             "contiguous_checkpointing": True},
    "checkpoint_in_cpu": {"checkpoint_activations": True, "checkpoint_in_cpu": True},
    "synchronize_each_layer": {"checkpoint_activations": True, "synchronize_each_layer": True},
    "profile_backward": {"checkpoint_activations": True, "profile_backward": True},
    "deepspeed_activation_checkpointing off": {
        "checkpoint_activations": True, "deepspeed_activation_checkpointing": False},
}  # fmt: skip


def _kept_for_backward(loss: torch.Tensor) -> tuple[int, int]:
    """``(checkpointed chunks, floating-point elements)`` that DeepSpeed's checkpoint
    functions keep for the backward pass (their inputs, partitioned or whole)."""
    chunks, elements, seen, stack = 0, 0, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kept = getattr(node, "deepspeed_saved_tensors", None)
        if kept is not None:
            chunks += 1
            for t in kept:
                if torch.is_tensor(t) and t.is_floating_point():
                    data = getattr(t, "saved_data", None)
                    elements += (data if data is not None else t).numel()
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return chunks, elements


def _train(rank: int, world: int) -> dict[str, Any]:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    state = ParallelState.initialize(RankTopology(world, 2, 1))
    vocab = padded_vocab_size(100, 8, 2)
    tokens, labels, mask = batch(2, 16, seed=5)
    results: dict[str, Any] = {}
    for name, keys in VARIANTS.items():
        cfg = make_config(world_size=2, model_parallel_size=2, num_layers=3, **DROPOUT, **keys)
        tracker = model_parallel_seed(1234, state)
        model = build(cfg, seed=3, state=state, tracker=tracker, padded_vocab=vocab).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses, kept = [], (0, 0)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            for step in range(STEPS):
                loss = lm_loss(model(tokens), labels, mask, state)
                if step == 0:
                    kept = _kept_for_backward(loss)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        results[name] = {"losses": losses, "kept": kept, "settings": current_settings()[0],
                         "printed": printed.getvalue()}
    return results


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return run_distributed(_train, 2, timeout=300)


@pytest.mark.distributed
def test_every_option_trains_to_the_same_losses_with_dropout(runs: list[dict[str, Any]]) -> None:
    for res in runs:
        reference = res["no checkpointing"]["losses"]
        assert len(set(reference)) == STEPS  # the model trains
        for name in VARIANTS:
            assert res[name]["losses"] == pytest.approx(reference, rel=1e-6, abs=1e-6), name


@pytest.mark.distributed
def test_partition_keeps_half_of_each_checkpointed_input_per_rank(
        runs: list[dict[str, Any]]) -> None:
    s, b, h = 16, 2, 32
    for res in runs:
        assert res["no checkpointing"]["kept"] == (0, 0)
        # one chunk per layer keeps its [s, b, h] input whole ...
        assert res["checkpoint_activations"]["kept"] == (3, 3 * s * b * h)
        assert res["checkpoint_num_layers 2"]["kept"] == (2, 2 * s * b * h)
        # ... or this rank's half of it
        for name in ("partition_activations", "distribute_checkpointed_activations",
                     "partition + checkpoint_in_cpu", "partition + contiguous_checkpointing"):
            assert res[name]["kept"] == (3, 3 * s * b * h // 2), name


@pytest.mark.distributed
def test_deepspeed_is_configured_as_the_keys_say(runs: list[dict[str, Any]]) -> None:
    settings = {name: res["settings"] for name, res in runs[0].items()}
    assert settings["partition_activations"].partition_activations
    assert settings["distribute_checkpointed_activations"].partition_activations
    assert settings["partition + checkpoint_in_cpu"].checkpoint_in_cpu
    contiguous = settings["partition + contiguous_checkpointing"]
    assert contiguous.contiguous_checkpointing and contiguous.num_checkpoints == 3
    assert settings["synchronize_each_layer"].synchronize
    assert settings["profile_backward"].profile
    assert settings["deepspeed_activation_checkpointing off"].is_default
    # profile_backward: DeepSpeed prints every chunk's forward and backward time on rank 0
    printed = runs[0]["profile_backward"]["printed"]
    assert printed.count("fwd:") == 3 * STEPS and printed.count("backward:") == 3 * STEPS
    assert "backward:" not in runs[0]["synchronize_each_layer"]["printed"]


def test_settings_from_the_config_keys() -> None:
    cfg = make_config(num_layers=5, checkpoint_activations=True, checkpoint_num_layers=2,
                      partition_activations=True, checkpoint_in_cpu=True,
                      contiguous_checkpointing=True, synchronize_each_layer=True,
                      profile_backward=True)
    assert checkpoint_settings(cfg.act_ckpt, 5) == CheckpointSettings(
        partition_activations=True, contiguous_checkpointing=True, num_checkpoints=3,
        checkpoint_in_cpu=True, synchronize=True, profile=True)
    # sequence parallelism already splits the activations: no second split
    sp = checkpoint_settings(cfg.act_ckpt, 5, sequence_parallel=True)
    assert not sp.partition_activations and not sp.contiguous_checkpointing
    # on CPU ranks the host is the device: nothing to move without partitioning
    alone = make_config(checkpoint_activations=True, checkpoint_in_cpu=True)
    assert not checkpoint_settings(alone.act_ckpt, 2).checkpoint_in_cpu


def test_config_refuses_contiguous_without_partition_and_warns_about_idle_keys() -> None:
    from megatron.neox_arguments import ConfigError

    with pytest.raises(ConfigError, match="contiguous_checkpointing needs partition_activations"):
        make_config(checkpoint_activations=True, contiguous_checkpointing=True)

    def warned(**keys: Any) -> str:
        return " | ".join(make_config(**keys).warnings)

    assert "no effect without checkpoint_activations" in warned(partition_activations=True)
    assert "no effect with deepspeed_activation_checkpointing: false" in warned(
        checkpoint_activations=True, deepspeed_activation_checkpointing=False,
        synchronize_each_layer=True)
    assert "already split" in warned(
        world_size=2, model_parallel_size=2, sequence_parallel=True,
        checkpoint_activations=True, partition_activations=True)
    assert "host memory already" in warned(checkpoint_activations=True, checkpoint_in_cpu=True)
    assert warned(checkpoint_activations=True, partition_activations=True,
                  synchronize_each_layer=True) == ""


def test_layers_behind_frozen_embeddings_still_get_gradients() -> None:
    """No checkpointed input needs a gradient (frozen embeddings, as with LoRA): the layers'
    parameters still get theirs, equal to those without checkpointing."""
    tokens, labels, mask = batch(2, 16)
    grads = []
    for ckpt in (False, True):
        model = build(make_config(checkpoint_activations=ckpt), seed=1).train()
        model.embed.requires_grad_(False)
        lm_loss(model(tokens), labels, mask, ParallelState.single()).backward()
        grads.append(model.layers[0].mlp.dense_h_to_4h.weight.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
