"""Checkpoints on disk.

* :mod:`~megatron.checkpoint.manifest` -- what makes a checkpoint directory complete: step tags
  (``global_stepN``), ``latest``, ``manifest.json`` (sizes and CRC-32s), :class:`CheckpointError`.
* :mod:`~megatron.checkpoint.resume` -- the training resume state: save and load through the
  DeepSpeed engine (model, optimizer, RNG states, configs), pruning old checkpoints.
* :mod:`~megatron.checkpoint.writer` -- writing a save's files (synchronously, or copied to
  host memory and written by a background thread with ``async_save``), CRC-32s, pruning.
* :mod:`~megatron.checkpoint.safe_load` -- every checkpoint file read with
  ``torch.load(weights_only=True)``.
* :mod:`~megatron.checkpoint.weights` -- a checkpoint's model weight files read and written
  without DeepSpeed (both the plain and the pipeline file layout), for generation, evaluation
  and conversion.
* :mod:`~megatron.checkpoint.reshard` -- tensor-parallel merge and split of full state dicts,
  with the split rules read from the layers.
* :mod:`~megatron.checkpoint.relayout` -- the layout each checkpoint records, the model-shape
  check on load, and resuming at another tensor/pipeline/data-parallel size or ZeRO stage.
"""

from megatron.checkpoint.manifest import CheckpointError

__all__ = ["CheckpointError"]
