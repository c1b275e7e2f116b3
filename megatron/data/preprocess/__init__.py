"""From raw text to indexed datasets: the library behind ``tools/datasets/*`` and
``prepare_data.py``.

* :mod:`~megatron.data.preprocess.text_inputs` -- streaming readers (jsonl / txt, gz / zst),
  record parsing with line numbers, byte-range sharding of the inputs.
* :mod:`~megatron.data.preprocess.encoders` -- batch encoders on the tokenizer libraries'
  own threads (tiktoken for byte-level BPE, ``tokenizers``, SentencePiece).
* :mod:`~megatron.data.preprocess.pipeline` -- ``preprocess()``: read, encode, write
  ``.bin``/``.idx`` atomically; the ``preprocess_data.py`` command line.
* :mod:`~megatron.data.preprocess.merge` -- ``merge_datasets()`` (also joins shards).
* :mod:`~megatron.data.preprocess.token_count` -- ``count_tokens()``.
* :mod:`~megatron.data.preprocess.tokenizer_training` -- ``train_bpe()``,
  ``train_sentencepiece()``.
* :mod:`~megatron.data.preprocess.corpora` -- named corpora and ``prepare_corpus()``.

Nothing here imports torch or DeepSpeed.
"""
