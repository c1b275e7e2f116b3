"""The GPT model (no pipeline engine), its loss, and incremental decoding with a KV cache.

::

    model = GPTModel(cfg.model, cfg.act_ckpt, padded_vocab_size=V, state=state, tracker=tracker)
    logits = model(tokens)                          # [b, s, V / tp], sharded on the vocabulary
    loss = lm_loss(logits, labels, loss_mask, state)
    full = gather_logits(logits, state)             # [b, s, V]

    cache = model.new_kv_cache(batch_size=b)        # incremental decoding
    logits = model(prompt, kv_cache=cache)          # prefill
    logits = model(next_token[:, None], kv_cache=cache)

Inside, activations are ``[seq, batch, hidden]``. The forward pass runs the blocks of
:func:`~megatron.model.layout.pipeline_layout` in order through
:func:`~megatron.model.blocks.run_blocks`, exactly as the pipeline stages do. See
``docs/model.md`` for every option.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron.model.args import ModelArgs, attention_layer_types
from megatron.model.attention import AttentionInputs
from megatron.model.blocks import block_specs, block_step, run_blocks
from megatron.model.embedding import OutputLayer
from megatron.model.layout import (
    Activations,
    PipeEntry,
    Step,
    first_index,
    pipeline_layout,
    preserved_rng,
    seeded_init,
)
from megatron.model.positional import RelativePositionBias
from megatron.parallel.activation_checkpointing import ActivationCheckpointing
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import register_sequence_parallel_grad_hooks
from megatron.parallel.mappings import gather_from_tp_region
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_model import ActivationCheckpointArgs


# ---------------------------------------------------------------------------- checks
def check_model_args(model: ModelArgs, state: ParallelState) -> None:
    """Raise ``ValueError`` for shapes the model cannot build (resolved configs pass)."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        if getattr(model, name) is None:
            raise ValueError(f"{name} must be set (resolve the config first)")
    assert model.hidden_size and model.num_attention_heads and model.num_layers
    heads, kv = model.num_attention_heads, model.num_kv_heads or model.num_attention_heads
    if model.hidden_size % heads or heads % kv or kv % state.tp_size:
        raise ValueError(
            f"hidden_size {model.hidden_size}, heads {heads}, kv heads {kv} and tensor parallel "
            f"{state.tp_size} must divide each other"
        )
    if model.num_unique_layers is not None and model.num_layers % model.num_unique_layers:
        raise ValueError("num_layers must be a multiple of num_unique_layers")


def layer_plan(model: ModelArgs) -> list[int]:
    """Index of the unique layer used at each depth: ``grouped`` AABB, ``spaced`` ABAB."""
    assert model.num_layers is not None
    unique = model.num_unique_layers or model.num_layers
    if model.param_sharing_style == "spaced":
        return [i % unique for i in range(model.num_layers)]
    repeat = model.num_layers // unique
    return [i // repeat for i in range(model.num_layers)]


def plain_causal_to_none(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """None when ``attention_mask`` is the plain causal mask shared by the batch
    (``[1, 1, s, s]``, True above the diagonal), so attention can use its causal kernel;
    otherwise the mask itself."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()
    if attention_mask.shape[0] != 1 or tuple(attention_mask.shape[-2:]) != (seq_len, seq_len):
        return attention_mask
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).triu(1)
    return None if torch.equal(attention_mask.reshape(seq_len, seq_len), causal) else attention_mask


# -------------------------------------------------------------------------- kv cache
@dataclass
class KVCache:
    """Keys and values of every layer: ``[b, local kv heads, max_length, head_dim]`` each
    (empty heads for layers without attention), and one recurrent-state dict per layer
    (``states``: the convolution and scan state of Mamba layers, the RWKV state, the past
    inputs of gMLP layers; empty for attention layers).

    ``length`` tokens are cached; the model appends the new ones and advances it after every
    forward with the cache. Reuse for a new batch with :meth:`reset`.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    max_length: int = field(init=False)
    states: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.max_length = self.keys[0].shape[2] if self.keys else 0
        self.states = [{} for _ in self.keys]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def reset(self) -> None:
        self.length = 0
        for slot in self.states:
            slot.clear()


# ----------------------------------------------------------------------------- model
class GPTModel(nn.Module):
    """Decoder-only transformer language model over tensor-parallel shards.

    ``forward(tokens [b, s], position_ids [b, s] | None, attention_mask | None, *, kv_cache)``
    returns logits ``[b, s, padded_vocab / tp]`` (this rank's vocabulary shard; possibly a
    non-contiguous view). ``attention_mask`` is None (plain causal) or bool ``[b or 1, 1, s, s]``
    with True = masked out; the plain causal mask is recognised and runs the causal kernel.
    ``sequence_parallel`` None takes ``state.sequence_parallel``; it only acts with TP > 1.
    """

    def __init__(
        self,
        model: ModelArgs,
        act_ckpt: ActivationCheckpointArgs,
        *,
        padded_vocab_size: int,
        state: ParallelState,
        tracker: RNGStatesTracker | None = None,
        sequence_parallel: bool | None = None,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        check_model_args(model, state)
        assert model.num_layers is not None and model.hidden_size is not None
        sp = state.sequence_parallel if sequence_parallel is None else sequence_parallel
        sp = sp and state.tp_size > 1
        needs_tracker = state.tp_size > 1 and (
            model.attention_dropout > 0 or (sp and model.hidden_dropout > 0)
        )
        if needs_tracker and tracker is None:
            raise ValueError("dropout under tensor parallelism needs an RNGStatesTracker")
        self.model_args = model
        self.state = state
        self.tracker = tracker
        self.sequence_parallel = sp
        self.padded_vocab_size = padded_vocab_size
        self.checkpointing = ActivationCheckpointing.from_config(
            act_ckpt, model.num_layers, state, sequence_parallel=sp)
        self.checkpoint_num_layers = self.checkpointing.layers
        self.plan = layer_plan(model)
        self.attention_types = attention_layer_types(model.attention_config, model.num_layers)
        specs = block_specs(model, padded_vocab_size=padded_vocab_size, state=state,
                            tracker=tracker, sequence_parallel=sp)

        def build(kind: str, layer: int = -1) -> Any:
            index = first_index(model, kind, layer)
            with seeded_init(None if init_seed is None else init_seed + index):
                return specs[index].build()

        with preserved_rng(init_seed is not None):
            self.embed = build("embed")
            self.rpe: RelativePositionBias | None = build("rpe") if model.pos_emb == "rpe" \
                else None
            # a shared layer is built for the first depth that uses it
            self.layers = nn.ModuleList(
                build("layer", self.plan.index(unique)) for unique in range(max(self.plan) + 1)
            )
            self.final_norm = build("final_norm")
            self.output_layer: OutputLayer | None = build("output") if model.no_weight_tying \
                else None
        if sp:  # backward sums the sequence-parallel parameters' gradients over the TP group
            register_sequence_parallel_grad_hooks(self, state)

    # ------------------------------------------------------------------ helpers
    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's ``[V / tp, h]`` output weight (the word embedding when tied)."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embed.word_embeddings.weight

    def new_kv_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Empty cache for ``batch_size`` sequences of up to ``max_length`` tokens
        (default ``max_position_embeddings``), in the parameters' dtype and device."""
        param = self.embed.word_embeddings.weight
        kwargs = {"dtype": dtype or param.dtype, "device": device or param.device}
        length = max_length or self.model_args.max_position_embeddings

        def buffer(depth: int) -> torch.Tensor:
            attn = getattr(self.layers[self.plan[depth]], "attention", None)
            if attn is None:  # a layer without attention keeps its state in ``states``
                return torch.zeros((batch_size, 0, length, 0), **kwargs)
            return torch.zeros((batch_size, attn.local_kv_heads, length, attn.head_dim),
                               **kwargs)

        depth = len(self.plan)
        return KVCache([buffer(i) for i in range(depth)], [buffer(i) for i in range(depth)])

    def steps(self) -> list[tuple[PipeEntry, Step]]:
        """The blocks in layout order, each as the step it runs (a shared layer once per
        depth, at that depth)."""
        blocks: dict[str, nn.Module | None] = {
            "embed": self.embed, "rpe": self.rpe, "final_norm": self.final_norm,
            "output": self.output_layer if self.output_layer is not None else self.embed,
        }  # fmt: skip
        steps: list[tuple[PipeEntry, Step]] = []
        for entry in pipeline_layout(self.model_args):
            if entry.kind == "layer":
                step: Step = functools.partial(
                    self.layers[self.plan[entry.layer]], layer_number=entry.layer + 1,
                    attention_type=self.attention_types[entry.layer],
                )  # fmt: skip
            else:
                block = blocks[entry.kind]
                assert block is not None
                step = block_step(entry, block)
            steps.append((entry, step))
        return steps

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        """Logits, or with ``hidden_only`` the final-norm hidden states ``[b, s, h]`` (the
        output layer is not run; for heads such as a reward model's)."""
        b, s = tokens.shape
        start = 0
        if kv_cache is not None:
            if self.sequence_parallel:
                raise ValueError("the KV cache needs sequence_parallel off")
            start = kv_cache.length
            if start + s > kv_cache.max_length:
                raise ValueError(f"KV cache holds {kv_cache.max_length} tokens, "
                                 f"{start} cached + {s} new do not fit")
        if position_ids is None:
            position_ids = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        if start == 0:
            attention_mask = plain_causal_to_none(attention_mask, s)
        act = Activations(tokens, AttentionInputs(position_ids, attention_mask, None, start),
                          kv_cache)
        recompute = self.training and kv_cache is None and torch.is_grad_enabled()
        steps = self.steps()
        act = run_blocks(steps[:-1] if hidden_only else steps, act, tracker=self.tracker,
                         checkpointing=self.checkpointing if recompute else None)
        if kv_cache is not None:
            kv_cache.length = start + s
        return act.x.transpose(0, 1) if hidden_only else act.x


# ------------------------------------------------------------------------------ loss
def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    state: ParallelState,
    fp32: bool = True,
) -> torch.Tensor:
    """Mean cross entropy over the tokens where ``loss_mask`` is non-zero (fp32 scalar).

    ``logits [b, s, V / tp]`` vocabulary-sharded, ``labels [b, s]`` token ids. ``fp32=False``
    (``fp16_lm_cross_entropy``) feeds the half-precision logits to the loss without an fp32
    copy; the vocab-parallel loss accumulates in fp32 either way.
    """
    if fp32:
        logits = logits.float()
    losses = vocab_parallel_cross_entropy(logits, labels, state)
    mask = loss_mask.reshape(losses.shape).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def gather_logits(logits: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Full-vocabulary logits ``[b, s, V]`` from every tensor-parallel rank's shard
    (collective; differentiable)."""
    return gather_from_tp_region(logits.contiguous(), state.tp_group)
