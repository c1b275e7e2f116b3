"""Tokenizers: ``build_tokenizer(tokenizer_type, vocab_file=..., merge_file=...)``.

See :mod:`megatron.tokenizer.tokenizer` for the supported types.
"""

from megatron.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    AbstractTokenizer,
    TokenizerError,
    build_tokenizer,
    vocab_size_with_padding,
)

__all__ = [
    "TOKENIZER_TYPES",
    "AbstractTokenizer",
    "TokenizerError",
    "build_tokenizer",
    "vocab_size_with_padding",
]
