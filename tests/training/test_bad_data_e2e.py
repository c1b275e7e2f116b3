"""Data the model cannot use, through deepy.py: one line naming the file, exit 2, no traceback."""

from __future__ import annotations

import re

import numpy as np
import pytest
from e2e_helpers import base_values, explain, run_deepy, write_config

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

pytestmark = pytest.mark.slow


def test_token_ids_beyond_the_vocabulary(tmp_path):
    """A corpus prepared with a bigger tokenizer than the run's (character level), read by
    two data-loader workers per rank; the other rank stops without a traceback too."""
    prefix = tmp_path / "wide"
    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(200):
        doc = rng.integers(1, 200, size=80)
        if i == 150:
            doc[40] = 5000
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    cfg = write_config(tmp_path / "run.yml", base_values(
        str(prefix), tmp_path / "run", train_iters=400, num_gpus=2, num_workers=2,
        split="100,0,0"))
    proc = run_deepy("configs/tiny_neox.yml", cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in out, explain(proc)
    assert re.search(rf"{re.escape(str(prefix))}\.bin: token id 5000 in document "
                     r"(\d+\.\.)?150 is outside the model's vocabulary of \d+", proc.stderr), \
        explain(proc)
    assert "deepy.py: error: rank" in proc.stderr.splitlines()[-1]
