"""Start-up shared by train.py, generate.py and eval.py: the resolved config, distributed
initialization, the parallel state, seeds, the device and the tokenizer (:func:`start`), and the
worker's exit path (:func:`run_main`)."""

from megatron.runtime.startup import Runtime, run_main, start, tokenizer_from_config

__all__ = ["Runtime", "run_main", "start", "tokenizer_from_config"]
