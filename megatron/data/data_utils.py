"""Build the train / valid / test datasets from the ``data`` config section.

Entry point for the training loop::

    train, valid, test = build_train_valid_test_datasets(
        data_cfg, seq_length=2048, seed=1234, train_val_test_num_samples=[n_train, n_valid, n_test]
    )

``data_cfg`` is the config's ``data`` section
(:class:`~megatron.neox_arguments.groups_io.DataArgs`, whose defaults are the schema's):
``data_path``, ``split``, ``train_data_paths``, ``valid_data_paths``,
``test_data_paths``, ``train_data_weights``, ``valid_data_weights``, ``test_data_weights``,
``train_label_data_paths``, ``valid_label_data_paths``, ``test_label_data_paths``,
``weight_by_num_documents``, ``weighted_sampler_alpha``, ``data_impl``, ``mmap_warmup``,
``use_shared_fs`` and ``data_cache_dir``.

* With ``train_data_paths`` (and optionally ``valid_``/``test_``), every split is the blend of
  its datasets. Weights default to equal; ``weight_by_num_documents`` replaces them by
  ``p_i ** alpha`` normalized, with ``p_i`` the dataset's share of documents and ``alpha`` =
  ``weighted_sampler_alpha`` (multinomial sampling as in XLM; alpha < 1 up-samples small
  datasets). Each dataset is built for ``ceil(1.005 * weight * n)`` samples so the blend of
  exactly ``n`` samples never runs short. ``*_label_data_paths`` give aligned label datasets.
* Otherwise ``data_path`` is one dataset whose documents are divided into consecutive
  train / valid / test ranges by ``split`` (``"949,50,1"``: relative weights, spaces and
  ``/`` separators accepted, missing entries are 0).

A split with no data or 0 requested samples is ``None``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.gpt2_dataset import GPT2Dataset
from megatron.data.indexed_dataset import MMapIndexedDataset, make_dataset

if TYPE_CHECKING:
    from megatron.neox_arguments.groups_io import DataArgs

SPLIT_NAMES = ("train", "valid", "test")
BLEND_MARGIN = 1.005


def parse_split(splits_string: str | Sequence[float]) -> list[float]:
    """Normalized ``[train, valid, test]`` fractions from ``"949,50,1"``-style text."""
    if isinstance(splits_string, str):
        sep = "," if "," in splits_string else "/"
        parts = [p.strip() for p in splits_string.split(sep) if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"split {splits_string!r} is not a list of numbers like '949,50,1'"
            ) from None
    else:
        values = [float(v) for v in splits_string]
    if not values or len(values) > 3:
        raise ValueError(f"split {splits_string!r} needs one to three numbers")
    if any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(f"split {splits_string!r} must be non-negative with a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def get_train_valid_test_split_(splits_string: str | Sequence[float], size: int) -> list[int]:
    """Document boundaries ``[0, a, b, size]`` of the three splits."""
    fractions = parse_split(splits_string)
    cum = np.cumsum(fractions)
    bounds = [0] + [int(round(c * size)) for c in cum[:-1]] + [size]
    return [min(max(b, 0), size) for b in bounds]


def weights_by_num_documents(num_documents: Sequence[int], alpha: float) -> list[float]:
    """``p_i ** alpha`` normalized, ``p_i`` = share of documents in dataset ``i``."""
    counts = np.asarray(num_documents, dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError(
            f"weight_by_num_documents needs non-empty datasets, got {list(num_documents)}"
        )
    probs = (counts / counts.sum()) ** float(alpha)
    return list(probs / probs.sum())


def normalized_weights_and_num_samples(
    weights: Sequence[float], num_samples: int
) -> tuple[list[float], list[int]]:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"data weights must be non-negative with a positive sum, got {list(weights)}"
        )
    w = w / w.sum()
    return list(w), [int(math.ceil(num_samples * wi * BLEND_MARGIN)) for wi in w]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def build_the_dataset(
    data_prefix: str,
    name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    *,
    data_impl: str = "mmap",
    skip_warmup: bool = True,
    label_prefix: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_shared_fs: bool = True,
    process_group: Any | None = None,
) -> GPT2Dataset:
    """A ``GPT2Dataset`` over every document of ``data_prefix``."""
    indexed = make_dataset(data_prefix, data_impl, skip_warmup)
    labels = make_dataset(label_prefix, data_impl, skip_warmup) if label_prefix else None
    return GPT2Dataset(
        name,
        data_prefix,
        np.arange(len(indexed), dtype=np.int64),
        indexed,
        num_samples,
        seq_length,
        seed,
        use_shared_fs=use_shared_fs,
        label_dataset=labels,
        cache_dir=cache_dir,
        process_group=process_group,
    )


def _build_split_from_paths(
    name: str,
    paths: list[str],
    weights: list[float] | None,
    label_paths: list[str],
    num_samples: int,
    cfg: DataArgs,
    seq_length: int,
    seed: int,
    cache_dir: str | os.PathLike | None,
    process_group: Any | None,
) -> Any:
    if not paths or num_samples <= 0:
        return None
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ValueError(
            f"{name}_data_weights has {len(weights)} entries but {name}_data_paths has {len(paths)}"
        )
    if label_paths and len(label_paths) != len(paths):
        raise ValueError(
            f"{name}_label_data_paths has {len(label_paths)} entries but {name}_data_paths has {len(paths)}"
        )
    data_impl = cfg.data_impl
    if cfg.weight_by_num_documents:
        docs = [make_dataset(p, data_impl).num_documents for p in paths]
        weights = weights_by_num_documents(docs, cfg.weighted_sampler_alpha)
    norm_weights, per_dataset = normalized_weights_and_num_samples(weights, num_samples)
    datasets = [
        build_the_dataset(
            path,
            name,
            n,
            seq_length,
            seed,
            data_impl=data_impl,
            skip_warmup=not cfg.mmap_warmup,
            label_prefix=label_paths[i] if label_paths else None,
            cache_dir=cache_dir,
            use_shared_fs=cfg.use_shared_fs,
            process_group=process_group,
        )
        for i, (path, n) in enumerate(zip(paths, per_dataset))
    ]
    return BlendableDataset(datasets, norm_weights, size=num_samples)


def build_train_valid_test_datasets_from_prefix(
    data_prefix: str,
    splits_string: str,
    train_val_test_num_samples: Sequence[int],
    seq_length: int,
    seed: int,
    *,
    data_impl: str = "mmap",
    skip_warmup: bool = True,
    cache_dir: str | os.PathLike | None = None,
    use_shared_fs: bool = True,
    process_group: Any | None = None,
) -> tuple[Any, Any, Any]:
    """Split the documents of one dataset into consecutive train / valid / test ranges."""
    indexed: MMapIndexedDataset = make_dataset(data_prefix, data_impl, skip_warmup)
    bounds = get_train_valid_test_split_(splits_string, len(indexed))
    out: list[Any] = []
    for i, name in enumerate(SPLIT_NAMES):
        lo, hi = bounds[i], bounds[i + 1]
        if hi <= lo or train_val_test_num_samples[i] <= 0:
            out.append(None)
            continue
        out.append(
            GPT2Dataset(
                name,
                data_prefix,
                np.arange(lo, hi, dtype=np.int64),
                indexed,
                train_val_test_num_samples[i],
                seq_length,
                seed,
                use_shared_fs=use_shared_fs,
                cache_dir=cache_dir,
                process_group=process_group,
            )
        )
    return out[0], out[1], out[2]


def build_train_valid_test_datasets(
    data_cfg: DataArgs,
    *,
    seq_length: int,
    seed: int,
    train_val_test_num_samples: Sequence[int],
    cache_dir: str | os.PathLike | None = None,
    process_group: Any | None = None,
) -> tuple[Any, Any, Any]:
    """``(train, valid, test)`` datasets for the data config (``None`` where absent).

    ``cache_dir`` (default: the config's ``data_cache_dir``, else next to each dataset) holds
    the index caches. Under ``torch.distributed`` every rank of ``process_group`` (default:
    all) must call this.
    """
    if cache_dir is None:
        cache_dir = data_cfg.data_cache_dir
    if len(train_val_test_num_samples) != 3:
        raise ValueError("train_val_test_num_samples needs three numbers (train, valid, test)")
    train_paths = _as_list(data_cfg.train_data_paths)
    if train_paths:
        splits = []
        for i, name in enumerate(SPLIT_NAMES):
            splits.append(
                _build_split_from_paths(
                    name,
                    _as_list(getattr(data_cfg, f"{name}_data_paths")),
                    getattr(data_cfg, f"{name}_data_weights"),
                    _as_list(getattr(data_cfg, f"{name}_label_data_paths")),
                    int(train_val_test_num_samples[i]),
                    data_cfg,
                    seq_length,
                    seed,
                    cache_dir,
                    process_group,
                )
            )
        return splits[0], splits[1], splits[2]
    data_path = data_cfg.data_path
    if not data_path:
        raise ValueError("the data config needs data_path or train_data_paths")
    if not isinstance(data_path, (str, os.PathLike)):
        paths = _as_list(data_path)
        if len(paths) != 1:
            raise ValueError(
                f"data_path takes one dataset prefix, got {len(paths)}; use train_data_paths to blend"
            )
        data_path = paths[0]
    return build_train_valid_test_datasets_from_prefix(
        os.fspath(data_path),
        data_cfg.split,
        [int(n) for n in train_val_test_num_samples],
        seq_length,
        seed,
        data_impl=data_cfg.data_impl,
        skip_warmup=not data_cfg.mmap_warmup,
        cache_dir=cache_dir,
        use_shared_fs=data_cfg.use_shared_fs,
        process_group=process_group,
    )
