"""How many samples and iterations a run needs: train_iters or train_epochs."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.data_utils import build_train_valid_test_datasets
from megatron.data.helpers import num_epochs_needed
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron.neox_arguments import RunFacts, merge_configs, resolve_config
from megatron.training.data_setup import sample_budget

SEQ = 16


def corpus(tmp_path, sizes):
    prefix = str(tmp_path / "docs")
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for n in sizes:
        builder.add_item(rng.integers(1, 100, size=n))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def cfg_for(prefix, **extra):
    values = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": SEQ,
              "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 1}},
              "data_path": prefix, "split": "80,20,0", "tokenizer_type": "CharLevelTokenizer",
              "eval_interval": 5, "eval_iters": 2, **extra}
    return resolve_config(merge_configs([("t.yml", values)]),
                          RunFacts(world_size=2, launching=False))


def test_budget_from_train_iters(tmp_path):
    cfg = cfg_for(corpus(tmp_path, [40] * 10), train_iters=12)
    budget = sample_budget(cfg)
    assert budget.train_iters == 12
    assert budget.train == 12 * 8  # global batch: micro 4 x 2 data-parallel ranks
    assert budget.valid == (12 // 5 + 1) * 2 * 8  # every evaluation, plus the final one
    assert budget.test == 2 * 8


@pytest.mark.parametrize("epochs", [1, 3])
def test_train_epochs_fit_whole_batches_into_the_epochs(tmp_path, epochs):
    prefix = corpus(tmp_path, [37, 55, 23, 80, 64, 41, 90, 12, 70, 33])
    cfg = cfg_for(prefix, train_epochs=epochs, do_test=False)
    budget = sample_budget(cfg)
    global_batch = 8
    assert budget.train == budget.train_iters * global_batch
    # the dataset's own epoch accounting: the budget fits in `epochs` passes over the train
    # split (its first 8 documents), and one more batch would not
    tokens_per_epoch = sum([37, 55, 23, 80, 64, 41, 90, 12])
    assert num_epochs_needed(tokens_per_epoch, SEQ, budget.train) <= epochs
    assert num_epochs_needed(tokens_per_epoch, SEQ, budget.train + global_batch) > epochs
    train, _, _ = build_train_valid_test_datasets(
        cfg.data, seq_length=SEQ, seed=1, train_val_test_num_samples=[budget.train, 0, 0])
    assert len(train) >= budget.train  # whole epochs are indexed


def test_too_small_for_one_batch_is_a_clear_error(tmp_path):
    from megatron.neox_arguments import ConfigError

    cfg = cfg_for(corpus(tmp_path, [20, 20, 20]), train_epochs=1)
    with pytest.raises(ConfigError, match="train_epochs: 1 epochs of .* samples make no full batch"):
        sample_budget(cfg)
