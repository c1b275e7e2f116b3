"""The GPT model as a DeepSpeed ``PipelineModule``, built from the blocks of
:class:`~megatron.model.gpt.GPTModel`.

Layer specs, in the order of :func:`~megatron.model.layout.pipeline_layout`::

    Embedding                          (TiedLayerSpec "embed" when the output layer is tied)
    [RelativePositionBias]             (TiedLayerSpec "rpe", before every layer, pos_emb: rpe)
    TransformerLayer x num_layers
    LayerNorm | RMSNorm | ScaleNorm    (the final norm)
    OutputLayer                        (or TiedLayerSpec "embed" computing the logits)

The specs build the model's own block classes; a stage runs its slice of the blocks through
:func:`~megatron.model.blocks.run_blocks`, like the plain model. The only pipeline-specific
step is at the stage boundaries, where :class:`~megatron.model.layout.Activations` become the
tuple of tensors DeepSpeed sends (:func:`activations_from_pipeline`,
:func:`activations_to_pipeline`): the first stage receives ``(tokens, position_ids,
attention_mask)`` (the mask as the data pipeline builds it) and the loss ``(labels,
loss_mask)``; between stages travel ``(hidden [s, b, h], position_ids, mask)`` where ``mask``
is empty (``numel() == 0``) for plain causal attention; the last stage returns the logits. The
type-based default partition ``type:transformer|mlp`` balances the ``TransformerLayer``
entries. With tied embeddings DeepSpeed keeps one copy of the word embedding on the first and
the last stage and sums their gradients (a last stage builds it without the position
embeddings); the T5 bias table is tied the same way across stages.

Sequence parallelism: the gradients of the sequence-parallel parameters (norms, row-parallel
biases) are summed over the tensor-parallel group by the hooks of
:func:`megatron.parallel.layers.register_sequence_parallel_grad_hooks`, which
:func:`build_pipeline_model` registers as the plain model does.

:func:`pipeline_to_model_state_dict` / :func:`model_to_pipeline_state_dict` translate between the
pipeline's state-dict names (``tied_modules.embed.*``, ``<spec index>.*``) and the plain model's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from deepspeed import comm as ds_comm
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils
from torch import nn

from megatron.model.args import ModelArgs
from megatron.model.attention import AttentionInputs
from megatron.model.blocks import (
    MIXER_LAYER_CLASSES,
    BlockSpec,
    block_specs,
    block_step,
    run_blocks,
)
from megatron.model.embedding import tied_output
from megatron.model.gpt import check_model_args, lm_loss, plain_causal_to_none
from megatron.model.layout import Activations, PipeEntry, Step, pipeline_layout, preserved_rng
from megatron.model.positional import RelativePositionBias
from megatron.model.transformer import TransformerLayer
from megatron.parallel.activation_checkpointing import ActivationCheckpointing
from megatron.parallel.layers import register_sequence_parallel_grad_hooks
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_model import ActivationCheckpointArgs, ParallelismArgs

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------- stage boundaries
def activations_from_pipeline(inputs: tuple[torch.Tensor, ...], *, first: bool) -> Activations:
    """The activations a stage starts from: the batch's ``(tokens, position_ids,
    attention_mask)`` on the first stage, ``(hidden, position_ids, mask)`` from the previous
    stage otherwise. An empty mask means plain causal attention, as does the plain causal mask
    itself on the first stage."""
    x, position_ids, mask = inputs
    attention_mask: torch.Tensor | None = mask if mask.numel() else None
    if first:
        attention_mask = plain_causal_to_none(attention_mask, x.shape[1])
    return Activations(x, AttentionInputs(position_ids, attention_mask))


def activations_to_pipeline(act: Activations) -> tuple[torch.Tensor, ...]:
    """The tensors a stage sends to the next (an empty mask stands for plain causal). The T5
    bias is not sent: every layer's bias entry sits on that layer's stage and recomputes it."""
    mask = act.inputs.attention_mask
    if mask is None:
        mask = torch.zeros(0, dtype=torch.bool, device=act.x.device)
    return act.x, act.inputs.position_ids, mask


# ------------------------------------------------------------------------ the module
@dataclass(frozen=True)
class PipelineLMLoss:
    """``loss_fn(logits, (labels, loss_mask))`` for the pipeline engine: :func:`lm_loss`."""

    state: ParallelState
    fp32: bool = True

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        targets, loss_mask = labels
        return lm_loss(logits, targets, loss_mask, self.state, fp32=self.fp32)


class GPTPipelineModule(PipelineModule):
    """``PipelineModule`` over the GPT blocks: runs this stage's blocks like
    :class:`~megatron.model.gpt.GPTModel` runs all of them (``checkpointing``: how many
    transformer layers per checkpointed chunk, and DeepSpeed's settings; ``tracker`` replaying
    dropout on recompute)."""

    def __init__(
        self,
        layers: list[LayerSpec],
        *,
        model: ModelArgs,
        state: ParallelState,
        tracker: RNGStatesTracker | None = None,
        checkpointing: ActivationCheckpointing | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers=layers, **kwargs)
        self.parallel_state = state
        self.tracker = tracker
        self.checkpointing = checkpointing
        layout = pipeline_layout(model)
        self.steps: list[tuple[PipeEntry, Step]] = [
            (layout[index], block_step(layout[index], self._block(index)))
            for index in range(self._local_start, self._local_stop)
        ]

    def _block(self, index: int) -> nn.Module:
        """The module this stage built for spec ``index``."""
        spec = self._layer_specs[index]
        if isinstance(spec, TiedLayerSpec):
            return self.tied_modules[spec.key]
        return getattr(self, str(index))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        act = activations_from_pipeline(inputs, first=self._local_start == 0)
        recompute = self.training and torch.is_grad_enabled()
        act = run_blocks(self.steps, act, tracker=self.tracker,
                         checkpointing=self.checkpointing if recompute else None)
        if self._local_stop == len(self._layer_specs):
            return act.x  # the logits, for loss_fn
        return activations_to_pipeline(act)

    def allreduce_tied_weight_gradients(self) -> None:
        # a frozen tied weight (LoRA trains the adapters only) has no gradient to sum
        for comm in self.tied_comms.values():
            for attr in comm["weight_attr"]:
                weight = self._recursive_getattr(comm["module"], attr)
                if weight.grad is not None:
                    ds_comm.all_reduce(weight.grad, group=comm["group"])

    def _partition_layers(self, method: str = "uniform") -> None:
        # DeepSpeed's own partitioning plus one rule: a T5 bias entry stays on its layer's stage
        self.parts = partition_pipeline_layers(self._layer_specs, method, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        if self.global_rank == 0:
            for s in range(self.num_stages):
                first, stop = self.parts[s], self.parts[s + 1]
                names = [spec.typename.__name__ for spec in self._layer_specs[first:stop]]
                logger.info("pipeline stage %d: specs %d-%d %s", s, first, stop - 1, names)
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


# ----------------------------------------------------------------------------- layout
class _SeededBuild:
    """Layer spec mixin: build under ``torch.manual_seed(init_seed)`` when it is set (see
    :mod:`megatron.model.layout`). DeepSpeed's own ``seed_layers`` also reseeds every forward
    pass from a counter a resumed run does not restore, so it is not used."""

    init_seed: int | None = None

    def build(self, log: bool = False) -> nn.Module:
        if self.init_seed is not None:
            torch.manual_seed(self.init_seed)
        return super().build(log=log)  # type: ignore[misc]


class SeededLayerSpec(_SeededBuild, LayerSpec):
    pass


class SeededTiedLayerSpec(_SeededBuild, TiedLayerSpec):
    pass


def pipeline_layer_specs(
    model: ModelArgs,
    *,
    padded_vocab_size: int,
    state: ParallelState,
    tracker: RNGStatesTracker | None,
    sequence_parallel: bool = False,
    init_seed: int | None = None,
) -> list[LayerSpec]:
    """DeepSpeed layer specs of the GPT model (built lazily, stage by stage); with
    ``init_seed``, spec ``i`` is built after ``torch.manual_seed(init_seed + i)``."""
    check_model_args(model, state)
    if model.num_unique_layers is not None:
        raise ValueError("num_unique_layers (shared layers) needs pipe_parallel_size: 0")
    assert model.num_layers is not None and model.hidden_size is not None
    blocks = block_specs(model, padded_vocab_size=padded_vocab_size, state=state,
                         tracker=tracker, sequence_parallel=sequence_parallel and state.tp_size > 1)

    def layer_spec(block: BlockSpec) -> LayerSpec:
        entry = block.entry
        if entry.kind in ("embed", "output") and entry.tied:
            forward_fn = tied_output if entry.kind == "output" else None
            return SeededTiedLayerSpec("embed", block.cls, **block.kwargs, forward_fn=forward_fn,
                                       tied_weight_attr=["word_embeddings.weight"])
        if entry.kind == "rpe":
            return SeededTiedLayerSpec("rpe", block.cls, **block.kwargs,
                                       tied_weight_attr=["relative_attention_bias.weight"])
        return SeededLayerSpec(block.cls, **block.kwargs)

    specs = [layer_spec(block) for block in blocks]
    if init_seed is not None:
        for index, spec in enumerate(specs):
            spec.init_seed = init_seed + index
    return specs


def partition_pipeline_layers(specs: list[LayerSpec], method: str, num_stages: int) -> list[int]:
    """Stage boundaries ``parts`` (stage ``i`` owns specs ``parts[i]:parts[i+1]``): DeepSpeed's
    ``parameters`` (balance trainable parameters; builds every spec to count it, as DeepSpeed
    does), ``uniform`` (balance spec counts) or ``type:regex`` (balance the specs whose class
    name matches), then a T5 bias entry is kept on its layer's stage.
    :class:`GPTPipelineModule` partitions with this function."""
    method = method.lower()
    if method == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(specs), num_parts=num_stages)
        return _keep_bias_with_layer(list(parts), specs)
    if method == "parameters":
        weights = [
            sum(p.numel() for p in spec.build().parameters() if p.requires_grad) for spec in specs
        ]
    elif method.startswith("type:"):
        pattern = re.compile(method.split(":")[1], re.IGNORECASE)
        # a layer without attention (Mamba, RWKV, gMLP) takes a transformer layer's place:
        # it also counts as one (GPT-NeoX's default "type:transformer|mlp" balances layers)
        weights = [1 if pattern.search(spec.typename.__name__) or (
            spec.typename in MIXER_LAYER_CLASSES and pattern.search(TransformerLayer.__name__))
            else 0 for spec in specs]
        if not any(weights):
            raise ValueError(f"partition method {method!r} matches no layer")
    else:
        raise ValueError(f"unknown partition method {method!r}")
    return _keep_bias_with_layer(
        list(ds_utils.partition_balanced(weights=weights, num_parts=num_stages)), specs
    )


def _keep_bias_with_layer(parts: list[int], specs: list[LayerSpec]) -> list[int]:
    """Move every stage boundary that falls right after a T5 bias entry one entry earlier, so
    the bias is computed on the stage of the layer using it (and never sent between stages)."""
    parts = list(parts)
    for i in range(1, len(parts) - 1):
        if 0 < parts[i] <= len(specs) and specs[parts[i] - 1].typename is RelativePositionBias:
            parts[i] -= 1
    if any(b <= a for a, b in zip(parts, parts[1:])):
        raise ValueError(f"too few layers for {len(parts) - 1} pipeline stages: {parts}")
    return parts


def build_pipeline_model(
    model: ModelArgs,
    act_ckpt: ActivationCheckpointArgs,
    parallelism: ParallelismArgs,
    *,
    padded_vocab_size: int,
    state: ParallelState,
    tracker: RNGStatesTracker | None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    sequence_parallel: bool | None = None,
    init_seed: int | None = None,
) -> GPTPipelineModule:
    """The GPT model as a :class:`GPTPipelineModule` over ``state``'s pipeline stages.

    Needs ``torch.distributed`` and ``deepspeed.comm`` initialized. ``loss_fn`` defaults to
    :class:`PipelineLMLoss` (fp32 unless ``fp16_lm_cross_entropy``); ``sequence_parallel`` None
    takes ``state.sequence_parallel``; ``init_seed`` seeds each block (see
    :mod:`megatron.model.layout`) so the weights equal the plain model's from the same seed.
    """
    stages = max(parallelism.pipe_parallel_size, 1)
    if stages != state.pp_size:
        raise ValueError(f"pipe_parallel_size {parallelism.pipe_parallel_size} but the parallel "
                         f"state has {state.pp_size} pipeline stages")
    sp = state.sequence_parallel if sequence_parallel is None else sequence_parallel
    specs = pipeline_layer_specs(model, padded_vocab_size=padded_vocab_size, state=state,
                                 tracker=tracker, sequence_parallel=sp, init_seed=init_seed)
    assert model.num_layers is not None
    checkpointing = ActivationCheckpointing.from_config(
        act_ckpt, model.num_layers, state, sequence_parallel=sp and state.tp_size > 1)
    with preserved_rng(init_seed is not None):
        module = GPTPipelineModule(
            specs, model=model, state=state, tracker=tracker, checkpointing=checkpointing,
            topology=state.topology.to_deepspeed(),
            loss_fn=loss_fn or PipelineLMLoss(state, fp32=not model.fp16_lm_cross_entropy),
            partition_method=parallelism.pipe_partition_method,
        )  # fmt: skip
    if sp and state.tp_size > 1:  # as in the plain model
        register_sequence_parallel_grad_hooks(module, state)
    return module


# ------------------------------------------------------------------------------ names
def _prefix_table(model: ModelArgs) -> list[tuple[str, str]]:
    """``(pipeline prefix, model prefix)`` pairs, longest pipeline prefixes first."""
    table: list[tuple[str, str]] = []
    for index, entry in enumerate(pipeline_layout(model)):
        if entry.kind == "embed":
            table.append((f"{index}.", "embed."))
            if entry.tied:
                table.append(("tied_modules.embed.", "embed."))
        elif entry.kind == "rpe":
            table += [(f"{index}.", "rpe."), ("tied_modules.rpe.", "rpe.")]
        elif entry.kind == "layer":
            table.append((f"{index}.", f"layers.{entry.layer}."))
        elif entry.kind == "final_norm":
            table.append((f"{index}.", "final_norm."))
        elif entry.tied:
            table.append((f"{index}.", "embed."))
        else:
            table.append((f"{index}.", "output_layer."))
    return sorted(set(table), key=lambda pair: -len(pair[0]))


def pipeline_key_to_model_key(key: str, model: ModelArgs) -> str:
    """The plain model's name of pipeline state-dict entry ``key``."""
    for pipe_prefix, model_prefix in _prefix_table(model):
        if key.startswith(pipe_prefix):
            return model_prefix + key[len(pipe_prefix) :]
    raise KeyError(f"{key!r} is not a state-dict name of the GPT pipeline")


def pipeline_to_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ModelArgs
) -> dict[str, torch.Tensor]:
    """Rename a pipeline state dict (one stage's or the union of all stages') to
    :class:`~megatron.model.gpt.GPTModel` names. Copies of tied weights collapse into one."""
    return {pipeline_key_to_model_key(k, model): v for k, v in state_dict.items()}


def model_to_pipeline_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ModelArgs
) -> dict[str, torch.Tensor]:
    """Every pipeline name (all stages, both copies of tied weights) for a
    :class:`~megatron.model.gpt.GPTModel` state dict, using the ``tied_modules.*`` names for tied
    entries. Load one stage with :func:`load_model_state_dict_into_pipeline`."""
    out: dict[str, torch.Tensor] = {}
    tied_prefixes = {"embed.": not model.no_weight_tying, "rpe.": True}
    for pipe_prefix, model_prefix in _prefix_table(model):
        if tied_prefixes.get(model_prefix) and not pipe_prefix.startswith("tied_modules."):
            continue
        for key, value in state_dict.items():
            if key.startswith(model_prefix):
                out[pipe_prefix + key[len(model_prefix) :]] = value
    return out


def load_model_state_dict_into_pipeline(
    pipe: PipelineModule, state_dict: Mapping[str, torch.Tensor], model: ModelArgs
) -> None:
    """Load a :class:`~megatron.model.gpt.GPTModel` state dict into this rank's stage (strict:
    every entry of the stage must be present)."""
    renamed = model_to_pipeline_state_dict(state_dict, model)
    own = pipe.state_dict()
    missing = [k for k in own if k not in renamed]
    if missing:
        raise KeyError(f"model state dict lacks {missing[:5]}")
    pipe.load_state_dict({k: renamed[k] for k in own}, strict=True)
