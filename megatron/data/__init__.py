"""Data layer: indexed token files, GPT sample packing, blending, samplers and masks.

Public entry points (see ``docs/data.md``):

* :mod:`megatron.data.indexed_dataset` -- ``MMapIndexedDataset`` / ``MMapIndexedDatasetBuilder``
  for the ``.bin`` + ``.idx`` token file format.
* :mod:`megatron.data.data_utils` -- ``build_train_valid_test_datasets`` (the training loop's
  entry point) and the split / weight helpers.
* :mod:`megatron.data.gpt2_dataset` -- ``GPT2Dataset``, fixed-length samples packed across
  documents with cached doc/sample/shuffle indices.
* :mod:`megatron.data.blendable_dataset` -- ``BlendableDataset``, weighted interleaving.
* :mod:`megatron.data.samplers` -- ``MegatronPretrainingSampler`` and ``build_data_loader``.
* :mod:`megatron.data.masks` -- ``get_ltor_masks_and_position_ids`` and ``prepare_lm_batch``.
* :mod:`megatron.data.helpers` -- the numpy index builders (doc / sample / shuffle, blending).
"""
