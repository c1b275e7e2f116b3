"""Index construction for packed GPT samples and dataset blending, vectorized with numpy.

No compiled extension is needed: every function here is a handful of numpy calls whose cost
is dominated by sorting / shuffling, linear in the number of documents and samples.

* ``num_epochs_needed(tokens_per_epoch, seq_length, num_samples)``
* ``build_doc_idx(documents, num_epochs, rng)`` -- one independent permutation of the
  documents per epoch, concatenated.
* ``build_sample_idx(sizes, doc_idx, seq_length)`` -- ``[n + 1, 2]`` array of
  ``(position in doc_idx, offset in that document)``: sample ``i`` is the ``seq_length + 1``
  tokens from row ``i`` up to and including row ``i + 1``, so consecutive samples overlap by
  one token (the last input token of one is the first of the next) and the first
  ``seq_length`` tokens of all samples tile the token stream exactly.
  ``build_sample_idx_reference`` is the same thing as a plain per-sample Python loop.
* ``build_shuffle_idx(num_samples, epoch_starts, rng)`` -- samples are shuffled within each
  epoch (a sample belongs to the epoch its first token is in), so consuming samples in
  shuffled order still visits every token once per epoch before the next epoch starts.
* ``build_blending_indices(weights, size)`` -- deterministic low-discrepancy interleaving:
  the ``j``-th draw of dataset ``k`` is due at time ``(j + 1/2) / w_k`` and draws are taken
  in due order (ties by dataset order). After any prefix of ``n`` draws every dataset's
  count is within about one of ``n * w_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def _index_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.int32) if max_value <= _INT32_MAX else np.dtype(np.int64)


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest number of epochs whose tokens make ``num_samples`` samples of ``seq_length + 1``."""
    if tokens_per_epoch <= 0:
        raise ValueError("cannot build samples from documents that hold no tokens")
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    needed = num_samples * seq_length + 1
    return max(1, -(-needed // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Per-epoch permutations of ``documents`` concatenated (int32 when it fits)."""
    documents = np.asarray(documents)
    dtype = _index_dtype(int(documents.max()) if len(documents) else 0)
    out = np.empty(num_epochs * len(documents), dtype=dtype)
    for e in range(num_epochs):
        out[e * len(documents) : (e + 1) * len(documents)] = rng.permutation(documents)
    return out


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int) -> np.ndarray:
    """Start ``(doc position, offset)`` of every sample, plus the end of the last one."""
    doc_lens = np.asarray(sizes)[doc_idx]
    ends = np.cumsum(doc_lens, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    if total < seq_length + 1:
        raise ValueError(f"{total} tokens cannot fill one sample of {seq_length + 1} tokens")
    n = (total - 1) // seq_length
    # Sample i starts at token i * seq_length. Document position k covers tokens
    # [ends[k] - len_k, ends[k]), so it holds the starts i < ceil(ends[k] / seq_length) not
    # already held by an earlier position: repeat each position that many times (empty
    # documents hold none) and subtract the document's first token from each start.
    counts = np.diff(-(-ends // seq_length), prepend=0)
    rows = np.stack([np.arange(len(ends), dtype=np.int64), doc_lens - ends], axis=1)
    rows = np.repeat(rows, counts, axis=0)[: n + 1]
    rows[:, 1] += np.arange(0, (n + 1) * seq_length, seq_length, dtype=np.int64)
    return rows.astype(_index_dtype(max(len(ends), int(doc_lens.max()))))


def build_sample_idx_reference(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int
) -> np.ndarray:
    """``build_sample_idx`` as a per-sample loop (the straightforward O(samples) algorithm)."""
    lens = [int(x) for x in np.asarray(sizes)[doc_idx]]
    total = sum(lens)
    if total < seq_length + 1:
        raise ValueError(f"{total} tokens cannot fill one sample of {seq_length + 1} tokens")
    n = (total - 1) // seq_length
    out = np.zeros((n + 1, 2), dtype=np.int64)
    d = 0
    while lens[d] == 0:
        d += 1
    off = 0
    out[0] = (d, 0)
    for i in range(1, n + 1):
        remaining = seq_length
        while True:
            avail = lens[d] - off
            if avail > remaining:
                off += remaining
                break
            remaining -= avail
            d += 1
            off = 0
        out[i, 0] = d
        out[i, 1] = off
    return out


def epoch_sample_starts(
    tokens_per_epoch: int, num_epochs: int, seq_length: int, num_samples: int
) -> np.ndarray:
    """First sample of each epoch (``num_epochs + 1`` boundaries clipped to ``num_samples``)."""
    bounds = -(-(np.arange(num_epochs + 1, dtype=np.int64) * tokens_per_epoch) // seq_length)
    return np.minimum(bounds, num_samples)


def build_shuffle_idx(
    num_samples: int, epoch_starts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A permutation of ``range(num_samples)`` that only shuffles within each epoch's block."""
    dtype = _index_dtype(num_samples)
    out = np.empty(num_samples, dtype=dtype)
    for lo, hi in zip(epoch_starts[:-1], epoch_starts[1:]):
        lo, hi = int(lo), int(hi)
        if hi > lo:
            out[lo:hi] = lo + rng.permutation(hi - lo)
    return out


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index, dataset_sample_index)`` for ``size`` draws in proportion to ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("blending needs at least one weight")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"blending weights must be non-negative with a positive sum, got {list(weights)}"
        )
    w = w / w.sum()
    due, which, rank = [], [], []
    for k, wk in enumerate(w):
        if wk == 0:
            continue
        count = min(size, int(np.ceil(wk * size)) + 1)
        j = np.arange(count, dtype=np.int64)
        due.append((j + 0.5) / wk)
        which.append(np.full(count, k, dtype=np.int64))
        rank.append(j)
    order = np.argsort(np.concatenate(due), kind="stable")[:size]
    ds_dtype = np.uint8 if len(w) <= 256 else np.int32
    dataset_index = np.concatenate(which)[order].astype(ds_dtype)
    dataset_sample_index = np.concatenate(rank)[order]
    return dataset_index, dataset_sample_index
