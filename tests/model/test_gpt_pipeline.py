"""The pipeline form: DeepSpeed PipelineModule with 2 stages against the plain model with 2
data-parallel ranks, both through ``deepspeed.initialize``; stage partitioning; state-dict
name mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from megatron.model import (
    GPTPipelineModule,
    build_model,
    build_pipeline_model,
    lm_loss,
    load_model_state_dict_into_pipeline,
    model_to_pipeline_state_dict,
    partition_pipeline_layers,
    pipeline_key_to_model_key,
    pipeline_layer_specs,
    pipeline_to_model_state_dict,
)
from megatron.model.blocks import block_step, run_blocks
from megatron.model.pipeline import (
    activations_from_pipeline,
    activations_to_pipeline,
    pipeline_layout,
)
from megatron.parallel import ParallelState, RankTopology, split_tensor
from tests.distributed import run_distributed
from tests.model.gpt_model_helpers import batch, build, document_mask, make_config

STEPS = 5
GLOBAL_BATCH = 4  # micro-batches of one sample per optimizer step
LR = 0.5
CLIP = 0.0


def _micro_batch(index: int, doc_mask: bool) -> tuple[tuple, tuple]:
    """Micro-batch ``index`` of the run; every step sees the same global batch, so the loss
    must go down."""
    tokens, labels, loss_mask = batch(1, 16, seed=100 + index % GLOBAL_BATCH)
    if doc_mask:
        mask, positions = document_mask(tokens, [5, 11])
    else:
        mask = torch.ones(16, 16, dtype=torch.bool).triu(1).view(1, 1, 16, 16)
        positions = torch.arange(16).view(1, 16)
    return (tokens, positions, mask), (labels, loss_mask)


def _ds_config(micro: int, gas: int) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10_000,
        "gradient_clipping": CLIP,
        "wall_clock_breakdown": False,
    }


def _checkpoint_layer_files(directory: str, model: Any) -> dict[str, torch.Tensor]:
    """Model-named tensors from DeepSpeed's per-layer pipeline checkpoint files."""
    out = {}
    for path in sorted(Path(directory).glob("layer_*-model_states.pt")):
        index = int(path.name.split("_")[1].split("-")[0])
        for key, value in torch.load(path, map_location="cpu").items():
            out[pipeline_key_to_model_key(f"{index}.{key}", model)] = value
    return out


def _pp_vs_dp(
    rank: int, world: int, overrides: dict, doc_mask: bool, steps: int = STEPS,
    save_dir: str | None = None,
) -> dict:  # fmt: skip
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = make_config(world_size=2, pipe_parallel_size=2, **overrides)
    reference = build(cfg, seed=3).state_dict()

    # PP=1: the plain model on 2 data-parallel ranks, 2 micro-batches each per step
    dp_state = ParallelState.initialize(RankTopology(2, 1, 1))
    model = build(cfg, seed=0, state=dp_state)
    model.load_state_dict(reference)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), mpu=dp_state,
        config=_ds_config(1, 2),
    )  # fmt: skip
    dp_losses = []
    for step in range(steps):
        total = torch.zeros(())
        for micro in range(2):
            (tokens, positions, mask), (labels, loss_mask) = _micro_batch(
                step * GLOBAL_BATCH + 2 * micro + rank, doc_mask
            )
            loss = lm_loss(engine(tokens, positions, mask), labels, loss_mask, dp_state)
            engine.backward(loss)
            engine.step()
            total += loss.detach() / 2
        torch.distributed.all_reduce(total)
        dp_losses.append(total.item() / 2)

    # PP=2: one pipeline, 4 micro-batches per step
    pp_state = ParallelState.initialize(RankTopology(2, 1, 2))
    pipe = build_pipeline_model(
        cfg.model, cfg.act_ckpt, cfg.parallelism,
        padded_vocab_size=cfg.tokenizer.padded_vocab_size, state=pp_state, tracker=None,
    )  # fmt: skip
    load_model_state_dict_into_pipeline(pipe, reference, cfg.model)
    pipe_engine, *_ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=LR),
        config=_ds_config(1, GLOBAL_BATCH),
    )  # fmt: skip
    data = iter([_micro_batch(i, doc_mask) for i in range(steps * GLOBAL_BATCH)])
    pp_losses = [pipe_engine.train_batch(data_iter=data).item() for _ in range(steps)]

    saved = {}
    if save_dir is not None:
        pipe_engine.save_checkpoint(save_dir, tag="last")
        torch.distributed.barrier()
        saved = _checkpoint_layer_files(f"{save_dir}/last", cfg.model)
    tied = {
        k: v.detach().clone() for k, v in pipe.state_dict().items() if k.startswith("tied_modules")
    }
    final_dp = pipeline_to_model_state_dict(
        model_to_pipeline_state_dict(model.state_dict(), cfg.model), cfg.model
    )
    final_pp = pipeline_to_model_state_dict(pipe.state_dict(), cfg.model)
    return {
        "dp": dp_losses,
        "pp": pp_losses,
        "parts": list(pipe.parts),
        "norms": (engine.get_global_grad_norm(), pipe_engine.get_global_grad_norm()),
        "tied": tied,
        "final_dp": final_dp,
        "final_pp": final_pp,
        "saved": saved,
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    "overrides, doc_mask",
    [
        ({"pos_emb": "learned", "num_layers": 4}, True),
        ({"pos_emb": "rpe", "num_layers": 4, "no_weight_tying": True, "rpe_num_buckets": 8,
          "rpe_max_distance": 16, "checkpoint_activations": True}, False),
    ],
    ids=["tied-learned-docmask", "untied-rpe-ckpt"],
)  # fmt: skip
def test_two_stage_pipeline_matches_data_parallel_plain_model(
    overrides: dict, doc_mask: bool, tmp_path: Path
) -> None:
    out = run_distributed(_pp_vs_dp, 2, overrides, doc_mask, STEPS, str(tmp_path), timeout=240)
    cfg = make_config(world_size=2, pipe_parallel_size=2, **overrides)
    for rank in range(2):
        # both stages report the same loss, equal to the data-parallel run at every step
        assert_close(torch.tensor(out[rank]["pp"]), torch.tensor(out[0]["dp"]), rtol=1e-5, atol=0)
    losses = out[0]["dp"]
    assert losses[-1] < losses[0] - 0.05, losses  # training moved the model
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    assert out[0]["parts"] == partition_pipeline_layers(specs, "type:transformer|mlp", 2)
    # every parameter of each stage ends where the plain model ends
    for rank in range(2):
        for name, value in out[rank]["final_pp"].items():
            assert_close(value, out[0]["final_dp"][name], rtol=1e-4, atol=1e-6, msg=name)
    # DeepSpeed's per-layer checkpoint files map to every model name
    assert set(out[0]["saved"]) == set(out[0]["final_dp"])
    for name, value in out[0]["saved"].items():
        assert_close(value, out[0]["final_dp"][name], rtol=1e-4, atol=1e-6, msg=name)
    if not cfg.model.no_weight_tying:
        # the two copies of the tied word embedding stay identical
        first, last = out[0]["tied"], out[1]["tied"]
        key = "tied_modules.embed.word_embeddings.weight"
        assert_close(first[key], last[key], rtol=0, atol=0)
    if cfg.model.pos_emb == "rpe":
        key = "tied_modules.rpe.relative_attention_bias.weight"
        assert_close(out[0]["tied"][key], out[1]["tied"][key], rtol=0, atol=0)


def _stage_names(cfg_overrides: dict, method: str) -> list[list[str]]:
    cfg = make_config(**cfg_overrides)
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    parts = partition_pipeline_layers(specs, method, 2)
    layout = pipeline_layout(cfg.model)
    names = [e.kind if e.kind != "layer" else f"layer{e.layer}" for e in layout]
    return [names[parts[i] : parts[i + 1]] for i in range(2)]


def test_partition_methods_place_the_expected_layers() -> None:
    four = {"num_layers": 4, "hidden_size": 32, "no_weight_tying": True}
    assert _stage_names(four, "type:transformer|mlp") == [
        ["embed", "layer0", "layer1"],
        ["layer2", "layer3", "final_norm", "output"],
    ]
    # uniform counts specs: 8 entries, 4 per stage
    assert _stage_names(four, "uniform") == [
        ["embed", "layer0", "layer1", "layer2"],
        ["layer3", "final_norm", "output"],
    ]
    # parameters: the embedding and the output layer (104 x 32 each) outweigh a layer (~12.7k)
    wide = {**four, "hidden_size": 64, "num_layers": 6}
    stages = _stage_names(wide, "parameters")
    assert stages[0][0] == "embed" and stages[1][-1] == "output"
    assert len(stages[0]) == 4 and len(stages[1]) == 5, stages
    # the T5 bias entries sit before their layers and do not count as transformer layers
    rpe = {**four, "pos_emb": "rpe"}
    assert _stage_names(rpe, "type:transformer")[1][-3:] == ["layer3", "final_norm", "output"]
    with pytest.raises(ValueError, match="matches no layer"):
        _stage_names(four, "type:nothing_matches")


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_names_round_trip_between_model_and_pipeline(tied: bool) -> None:
    cfg = make_config(num_layers=3, pos_emb="rpe", no_weight_tying=not tied,
                      rpe_num_buckets=8, rpe_max_distance=16)
    model = build(cfg)
    sd = model.state_dict()
    as_pipe = model_to_pipeline_state_dict(sd, cfg.model)
    # the names are those of the modules the specs build
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    built: set[str] = set()
    for index, spec in enumerate(specs):
        module = spec.build()
        key = getattr(spec, "key", None)
        if key is not None and getattr(spec, "forward_fn", None) is not None:
            continue  # the tied output layer reuses the embedding module
        prefix = f"tied_modules.{key}." if key is not None else f"{index}."
        built |= {prefix + name for name in module.state_dict()}
    assert set(as_pipe) == built
    back = pipeline_to_model_state_dict(as_pipe, cfg.model)
    assert set(back) == set(sd)
    for name, value in sd.items():
        assert back[name] is value
    with pytest.raises(KeyError):
        pipeline_to_model_state_dict({"tied_modules.other.weight": torch.zeros(1)}, cfg.model)


def test_pipeline_layers_compute_the_plain_model() -> None:
    """Running the specs one after another (one stage) gives the plain model's logits."""
    cfg = make_config(num_layers=2, pos_emb="rpe", rpe_num_buckets=8, rpe_max_distance=16,
                      attention_config=[[["local", "global"], 2]], sliding_window_width=5)
    model = build(cfg).eval()
    specs = pipeline_layer_specs(cfg.model, padded_vocab_size=cfg.tokenizer.padded_vocab_size,
                                 state=ParallelState.single(), tracker=None)
    modules: dict[str, torch.nn.Module] = {}
    steps = []
    for index, (entry, spec) in enumerate(zip(pipeline_layout(cfg.model), specs)):
        key = getattr(spec, "key", None)
        name = str(index) if key is None else key
        if name not in modules:
            modules[name] = spec.build()
        steps.append((entry, block_step(entry, modules[name])))
    holder = torch.nn.ModuleDict(modules)
    pipe_sd = model_to_pipeline_state_dict(model.state_dict(), cfg.model)
    for name, module in holder.items():
        prefix = f"tied_modules.{name}." if not name.isdigit() else f"{name}."
        own = {k[len(prefix) :]: v for k, v in pipe_sd.items() if k.startswith(prefix)}
        module.load_state_dict(own)
        module.eval()
    tokens, _, _ = batch(2, 16)
    mask, positions = document_mask(tokens, [6])
    # two stages, cut after the first transformer layer, and the tensors sent between them
    half = [entry.kind for entry, _ in steps].index("layer") + 1
    act = run_blocks(steps[:half], activations_from_pipeline((tokens, positions, mask), first=True))
    sent = activations_to_pipeline(act)
    x = run_blocks(steps[half:], activations_from_pipeline(sent, first=False)).x
    assert_close(x, model(tokens, positions, mask), rtol=1e-5, atol=1e-6)


def _pipeline_tp_sp_step(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = make_config(world_size=2, model_parallel_size=2, pipe_parallel_size=1,
                      sequence_parallel=True, pos_emb="rotary", num_kv_heads=2)
    vocab = cfg.tokenizer.padded_vocab_size
    state = ParallelState.initialize(RankTopology(2, 2, 1), sequence_parallel=True)
    # TP-invariant init: the TP=2 model from seed 3 holds the shards of the dense one
    shards = build(cfg, seed=3, state=state).state_dict()
    pipe = build_model(cfg.model, cfg.act_ckpt, cfg.parallelism, padded_vocab_size=vocab,
                       state=state, tracker=None)
    assert isinstance(pipe, GPTPipelineModule) and pipe.parallel_state.sequence_parallel
    load_model_state_dict_into_pipeline(pipe, shards, cfg.model)
    engine, *_ = deepspeed.initialize(
        model=pipe, optimizer=torch.optim.SGD(pipe.parameters(), lr=LR),
        config={**_ds_config(2, 1), "train_batch_size": 2},
    )  # fmt: skip
    tokens, labels, loss_mask = batch(2, 16, seed=9)
    mask, positions = document_mask(tokens, [7])
    loss = engine.train_batch(data_iter=iter([((tokens, positions, mask), (labels, loss_mask))]))
    after = pipeline_to_model_state_dict(pipe.state_dict(), cfg.model)
    attrs = {
        n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0),
            getattr(p, "partition_stride", 1))
        for n, p in build(cfg, state=state).named_parameters()
    }  # fmt: skip
    return {"loss": loss.item(), "after": after, "attrs": attrs}


@pytest.mark.distributed
def test_pipeline_engine_step_with_tensor_and_sequence_parallelism() -> None:
    """One optimizer step of the 1-stage pipeline on TP=2 with sequence parallelism equals the
    dense model's step: the norms' partial gradients are summed by the pipeline module."""
    out = run_distributed(_pipeline_tp_sp_step, 2, timeout=240)
    cfg = make_config(world_size=2, model_parallel_size=2, pipe_parallel_size=1,
                      sequence_parallel=True, pos_emb="rotary", num_kv_heads=2)
    dense = build(cfg, seed=3, padded_vocab=cfg.tokenizer.padded_vocab_size)
    tokens, labels, loss_mask = batch(2, 16, seed=9)
    mask, positions = document_mask(tokens, [7])
    loss = lm_loss(dense(tokens, positions, mask), labels, loss_mask, ParallelState.single())
    loss.backward()
    with torch.no_grad():
        for p in dense.parameters():
            p -= LR * p.grad
    expected = dense.state_dict()
    for rank in range(2):
        assert out[rank]["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert set(out[rank]["after"]) == set(expected)
        for name, value in out[rank]["after"].items():
            sharded, dim, stride = out[rank]["attrs"][name]
            full = split_tensor(expected[name], dim, 2, rank, stride) if sharded else expected[name]
            assert_close(value, full, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


def test_stage_boundaries_read_an_empty_or_plain_causal_mask_as_causal() -> None:
    tokens, _, _ = batch(2, 8)
    positions = torch.arange(8).expand(2, 8)
    empty = torch.zeros(0, dtype=torch.bool)
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1).view(1, 1, 8, 8)
    for mask, first in ((empty, True), (empty, False), (causal, True)):
        act = activations_from_pipeline((tokens, positions, mask), first=first)
        assert act.inputs.attention_mask is None
    doc, _ = document_mask(tokens, [3])
    act = activations_from_pipeline((tokens, positions, doc), first=True)
    assert act.inputs.attention_mask is doc
    sent = activations_to_pipeline(act.with_x(torch.zeros(8, 2, 4)))
    assert sent[1] is positions and sent[2] is doc
    assert activations_to_pipeline(activations_from_pipeline(sent, first=False))[2] is doc
    assert activations_to_pipeline(
        activations_from_pipeline((tokens, positions, empty), first=True))[2].numel() == 0
