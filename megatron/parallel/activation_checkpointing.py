"""Activation checkpointing through DeepSpeed's ``deepspeed.checkpointing`` module.

A checkpointed chunk of layers keeps only its inputs in the forward pass and runs again in
the backward pass to rebuild its activations. DeepSpeed's module does the work, configured
from the ``checkpoint_*`` keys as GPT-NeoX configures it:

* ``partition_activations`` (Megatron: ``distribute_checkpointed_activations``): every
  tensor-parallel rank keeps only its ``1 / tp`` slice of each checkpointed input; the
  backward pass all-gathers the slices over the tensor-parallel group;
* ``checkpoint_in_cpu``: the kept inputs live in host memory and come back to the device for
  the recomputation;
* ``contiguous_checkpointing``: the kept (partitioned) inputs of all chunks are copied into
  one preallocated buffer per input, sized for ``num_checkpoints`` chunks (DeepSpeed offers it
  with ``partition_activations`` only);
* ``synchronize_each_layer``: the device is synchronized at the start and end of every
  checkpointed chunk, forward and backward;
* ``profile_backward``: every checkpointed chunk prints its forward and backward time
  (``time (ms) | fwd: ...`` and ``... | backward: ...``, rank 0).

DeepSpeed keeps these settings in its module, once per process; :func:`checkpoint` applies
the settings of the model that calls it before running a chunk (:func:`ensure_configured`),
so two models with different settings in one process each get their own. The parallel
state is DeepSpeed's ``mpu`` (the tensor-parallel group to split over).

Dropout in a recomputed chunk must draw the masks of the forward pass. DeepSpeed restores
the default generators (CPU and device) and its own tracker's streams; the streams of this
framework's :class:`~megatron.parallel.random.RNGStatesTracker` are restored here: the
recomputation runs from a snapshot of the tracker taken when the chunk first ran, and the
tracker continues afterwards from where the forward pass left it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron import accelerator
from megatron.parallel.random import RNGStatesTracker
from megatron.parallel.state import ParallelState

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_model import ActivationCheckpointArgs


@dataclass(frozen=True)
class CheckpointSettings:
    """What ``deepspeed.checkpointing.configure`` is given (its keyword names)."""

    partition_activations: bool = False
    contiguous_checkpointing: bool = False
    num_checkpoints: int | None = None
    checkpoint_in_cpu: bool = False
    synchronize: bool = False
    profile: bool = False

    @property
    def is_default(self) -> bool:
        """True when nothing differs from DeepSpeed's unconfigured behaviour."""
        return self == CheckpointSettings(num_checkpoints=self.num_checkpoints)


def checkpoint_settings(act_ckpt: ActivationCheckpointArgs, num_layers: int, *,
                        sequence_parallel: bool = False) -> CheckpointSettings:
    """The DeepSpeed settings of a model with ``num_layers`` layers, as GPT-NeoX derives
    them: ``num_checkpoints`` is the number of chunks (``num_layers / checkpoint_num_layers``
    rounded up). ``deepspeed_activation_checkpointing: false`` leaves DeepSpeed unconfigured
    (plain recomputation, as in GPT-NeoX).

    Two adjustments keep the result right where DeepSpeed's module would not:

    * with sequence parallelism the checkpointed activations are already split along the
      sequence over the tensor-parallel ranks (each holds a different slice), so they are not
      partitioned again: partitioning assumes every rank holds the same whole tensor;
    * on CPU ranks the device is the host: ``checkpoint_in_cpu`` has nothing to move, and is
      only passed on together with ``partition_activations`` (DeepSpeed's unpartitioned host
      copy of a tensor that is already on the host is the tensor itself, which its own clean-up
      would then empty).
    """
    if not act_ckpt.deepspeed_activation_checkpointing:
        return CheckpointSettings()
    chunk = max(1, act_ckpt.checkpoint_num_layers)
    partition = act_ckpt.partition_activations and not sequence_parallel
    in_cpu = act_ckpt.checkpoint_in_cpu and (partition or accelerator.is_gpu())
    return CheckpointSettings(
        partition_activations=partition,
        contiguous_checkpointing=act_ckpt.contiguous_checkpointing and partition,
        num_checkpoints=-(-num_layers // chunk),
        checkpoint_in_cpu=in_cpu,
        synchronize=act_ckpt.synchronize_each_layer,
        profile=act_ckpt.profile_backward,
    )


@dataclass(frozen=True)
class ActivationCheckpointing:
    """How a model checkpoints: chunks of ``layers`` transformer layers (0: no
    checkpointing) through DeepSpeed configured with ``settings`` and ``state`` as ``mpu``."""

    layers: int = 0
    settings: CheckpointSettings = CheckpointSettings()
    state: ParallelState | None = None

    @classmethod
    def from_config(cls, act_ckpt: ActivationCheckpointArgs, num_layers: int,
                    state: ParallelState, *, sequence_parallel: bool = False
                    ) -> ActivationCheckpointing:
        """``checkpoint_activations`` off gives ``layers`` 0."""
        layers = act_ckpt.checkpoint_num_layers if act_ckpt.checkpoint_activations else 0
        return cls(layers, checkpoint_settings(act_ckpt, num_layers,
                                               sequence_parallel=sequence_parallel), state)


def _deepspeed_module() -> Any:
    import deepspeed

    return deepspeed.checkpointing


def current_settings() -> tuple[CheckpointSettings, Any]:
    """DeepSpeed's module settings now, and its ``mpu``."""
    ds = _deepspeed_module()
    return CheckpointSettings(
        partition_activations=bool(ds.PARTITION_ACTIVATIONS),
        contiguous_checkpointing=bool(ds.CONTIGUOUS_CHECKPOINTING),
        num_checkpoints=ds.num_layers,
        checkpoint_in_cpu=bool(ds.CPU_CHECKPOINT),
        synchronize=bool(ds.SYNCHRONIZE),
        profile=bool(ds.PROFILE_TIME),
    ), ds.mpu


def ensure_configured(settings: CheckpointSettings, state: ParallelState) -> None:
    """Configure DeepSpeed's module with ``settings`` and ``state`` as its ``mpu`` unless it
    already is. DeepSpeed's ``configure`` needs its communication set up
    (``deepspeed.init_distributed``), except where nothing is to be changed from its
    unconfigured behaviour."""
    ds = _deepspeed_module()
    now, mpu = current_settings()
    if settings.is_default and now.is_default:
        return  # DeepSpeed's behaviour does not depend on anything else then
    mpu_wanted = None if state.is_single else state
    if now == settings and (mpu is mpu_wanted or mpu_wanted is None):
        return
    from deepspeed import comm

    if not comm.is_initialized():
        raise RuntimeError(
            "partition_activations, checkpoint_in_cpu, contiguous_checkpointing, "
            "synchronize_each_layer and profile_backward need DeepSpeed's communication "
            "(deepspeed.init_distributed) set up before the first checkpointed forward pass")
    ds.configure(mpu_wanted, **vars(settings))


def _replaying(function: Callable[..., Any],
               tracker: RNGStatesTracker | None) -> Callable[..., Any]:
    """``function`` whose second call (the recomputation) draws from the tracker's streams
    as they were at the first call, and leaves them as the first call had left them."""
    if tracker is None:
        return function
    first: dict[str, torch.Tensor] = {}
    calls = [0]

    def run(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            first.update(tracker.get_states())
            return function(*args)
        live = tracker.get_states()
        tracker.set_states(first)
        try:
            return function(*args)
        finally:
            tracker.set_states(live)

    return run


def checkpoint(function: Callable[..., Any], tracker: RNGStatesTracker | None,
               *args: Any) -> Any:
    """``function(*args)`` through ``deepspeed.checkpointing.checkpoint``: its activations
    are recomputed in the backward pass, dropout inside ``tracker.fork()`` included.

    ``args`` should be tensors (DeepSpeed partitions the floating-point ones; the others are
    kept as they are). Where no floating-point argument needs a gradient (frozen embeddings,
    as with LoRA), DeepSpeed's non-reentrant variant is used, which still gives the
    parameters inside ``function`` their gradients.
    """
    ds = _deepspeed_module()
    run = _replaying(function, tracker)
    needs_grad = any(torch.is_tensor(a) and a.requires_grad for a in args)
    if needs_grad or not torch.is_grad_enabled():
        return ds.checkpoint(run, *args)
    return ds.non_reentrant_checkpoint(run, *args)
