"""RNG states that keep dropout consistent across model-parallel ranks.

Two streams matter under tensor parallelism:

* the *default* RNG, identical on all tensor-parallel ranks of a stage, used for dropout on
  replicated activations (outside tensor-parallel regions) and for weight init, so every
  shard sees the same random numbers;
* the ``model-parallel-rng`` stream, different on every tensor-parallel rank, used (via
  ``tracker.fork()``) for dropout on sharded activations such as attention probabilities,
  so different shards of one tensor get independent masks.

The tracker swaps named generator states in and out of the compute device's default
generator (the CPU generator on CPU ranks, the GPU generator through
:mod:`megatron.accelerator` on GPU ranks). It is an ordinary object owned by the model or
trainer; nothing here is global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron import accelerator
from megatron.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Offsets of the seeds derived from the user's seed (the values Megatron uses, so runs seeded
# alike draw alike).
PIPE_SEED_STRIDE = 100
MODEL_PARALLEL_SEED_OFFSET = 2718


def _current_state() -> torch.Tensor:
    if accelerator.is_gpu():
        state = accelerator.device_rng_state()
        assert state is not None
        return state
    return torch.get_rng_state()


def _set_current_state(state: torch.Tensor) -> None:
    if accelerator.is_gpu():
        accelerator.set_device_rng_state(state)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int) -> torch.Tensor:
    """Generator state of the compute device freshly seeded with ``seed``; the default
    generator is not touched."""
    gen = torch.Generator(device=accelerator.device())
    gen.manual_seed(seed)
    return gen.get_state()


class RNGStatesTracker:
    """Named generator states that can temporarily replace the default one."""

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Register a new stream ``name`` seeded with ``seed`` (both must be unused)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        for other, used in self._seeds.items():
            if used == seed:
                raise ValueError(f"seed {seed} already used by RNG state {other!r}")
        self._states[name] = _seeded_state(seed)
        self._seeds[name] = seed

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default stream is left where it
        was and ``name`` continues from where the block stopped next time."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added (known: {self.names()})")
        saved = _current_state()
        _set_current_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _current_state()
            _set_current_state(saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of all named states (for checkpoints)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace all named states (from :meth:`get_states`)."""
        self._states = {name: state.clone() for name, state in states.items()}
        self._seeds = {name: seed for name, seed in self._seeds.items() if name in states}


def model_parallel_seed(seed: int, state: ParallelState) -> RNGStatesTracker:
    """Seed this rank the way Megatron does and return the tracker to use with it.

    * default RNG: ``seed + 100 * pp_rank`` (equal on all TP and DP ranks of a stage),
      set with :func:`megatron.accelerator.manual_seed_all`;
    * ``model-parallel-rng``: ``seed + 100 * pp_rank + 2718 + tp_rank`` (one per shard).

    Python's ``random`` and NumPy are the caller's business.
    """
    default_seed = seed + PIPE_SEED_STRIDE * state.pp_rank
    accelerator.manual_seed_all(default_seed)
    tracker = RNGStatesTracker()
    tracker.add(MODEL_PARALLEL_RNG, default_seed + MODEL_PARALLEL_SEED_OFFSET + state.tp_rank)
    return tracker
