"""Conversion between this framework's checkpoints and Hugging Face model directories.

* :mod:`~megatron.conversion.hf_mapping` -- what maps to what: parameter names and layouts,
  configs, what each Hugging Face class can express (:class:`ConversionError` otherwise).
* :mod:`~megatron.conversion.hf_files` -- files of a Hugging Face directory: safetensors
  weights, tokenizers, vocabulary padding.
* :mod:`~megatron.conversion.neox_to_hf` -- a checkpoint (any layout, any tensor-parallel
  size) to a Hugging Face directory.
* :mod:`~megatron.conversion.hf_to_neox` -- a Hugging Face directory to a checkpoint and config
  the trainer loads.

Checkpoint files themselves are read and written by :mod:`megatron.checkpoint.weights`. The
command lines are ``tools/ckpts/convert_neox_to_hf.py`` and ``tools/ckpts/convert_hf_to_neox.py``
(docs/conversion.md).
"""

from megatron.conversion.hf_mapping import ConversionError

__all__ = ["ConversionError"]
