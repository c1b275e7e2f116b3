"""Position encodings: rotary, ALiBi, T5 relative buckets and sinusoidal.

(Learned absolute positions are an ``nn.Embedding`` in :mod:`megatron.model.embedding`.)

* **Rotary** (Su et al., RoFormer), rotate-half convention as in Hugging Face GPT-NeoX and
  Llama: dimension ``i`` of the rotated part is paired with dimension ``i + d/2`` and rotated by
  the angle ``p * base^(-2i/d)`` at position ``p``. Only the first ``d = head_dim * rotary_pct``
  dimensions of every head rotate (partial rotary, GPT-NeoX/Pythia). cos/sin tables up to
  ``max_position_embeddings`` are computed in fp32 once per device and shared by all layers.
* **ALiBi** (Press et al.): head ``h`` adds ``-m_h * (i - j)`` to the score of query ``i`` and
  key ``j``. For ``n`` heads a power of two, ``m_h = 2^(-8 (h+1) / n)``; otherwise the slopes of
  the largest power of two ``p < n`` followed by every other slope of ``2p`` heads.
* **T5 relative buckets** (Raffel et al.), causal form: the distance ``n = i - j >= 0`` maps to
  bucket ``n`` below ``B/2`` and to ``B/2 + floor(log(n / (B/2)) / log(D / (B/2)) * B/2)``
  (capped at ``B - 1``) above, for ``B = rpe_num_buckets`` and ``D = rpe_max_distance``. One
  learned ``[B, heads]`` table is shared by all layers.
* **Sinusoidal** (Vaswani et al.): ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-2k/h)``,
  added to the token embeddings.

Position-dependent tables are plain tensor attributes (not buffers): a module cast to bf16 keeps
them in fp32 and they never enter checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron.model.init_methods import InitFn
from megatron.parallel.layers import master_weight, set_tensor_parallel_attributes, split_tensor
from megatron.parallel.state import ParallelState


# ---------------------------------------------------------------------------- rotary
def rotary_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    """``base^(-2i/dim)`` for ``i < dim/2``, fp32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    return 1.0 / (base**exponents)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary embeddings over the first ``dim`` dimensions of each head.

    ``save_inv_freq`` keeps the inverse frequencies as a persistent buffer (in checkpoints,
    for ``rotary_save_freqs_buffer``); the tables are always recomputed in fp32.
    """

    def __init__(
        self, dim: int, *, base: float, max_positions: int, save_inv_freq: bool = False
    ) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dimension must be even and at least 2, got {dim}")
        self.dim = dim
        self.base = base
        self.max_positions = max_positions
        self.register_buffer(
            "inv_freq", rotary_inverse_frequencies(dim, base), persistent=save_inv_freq
        )
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(cos, sin)`` of shape ``[max_positions, dim]`` on ``device``."""
        if self._tables is None or self._tables[0].device != device:
            inv_freq = rotary_inverse_frequencies(self.dim, self.base).to(device)
            positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            angles = torch.outer(positions, inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._tables = (angles.cos(), angles.sin())
        return self._tables

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` for ``position_ids [b, s]``, shaped ``[b, 1, s, dim]`` (fp32)."""
        cos, sin = self.tables(position_ids.device)
        return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, max_positions={self.max_positions}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x [b, heads, s, head_dim]`` (in fp32);
    the remaining dims pass through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    rotf = rot.float()
    rotated = (rotf * cos + rotate_half(rotf) * sin).to(x.dtype)
    if rest.shape[-1] == 0:
        return rotated
    return torch.cat([rotated, rest], dim=-1)


# ----------------------------------------------------------------------------- alibi
def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes for ``num_heads`` heads (any count, see the module docstring)."""

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two_slopes(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: num_heads - lower]


def query_key_distance(
    q_len: int, k_len: int, start_pos: int, device: torch.device
) -> torch.Tensor:
    """``i - j`` for query positions ``start_pos + [0, q_len)`` and keys ``[0, k_len)``:
    ``[q_len, k_len]`` int64."""
    q = torch.arange(start_pos, start_pos + q_len, device=device)
    k = torch.arange(k_len, device=device)
    return q[:, None] - k[None, :]


def alibi_bias(slopes: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """``[1, heads, q, k]`` fp32 bias ``-slope * (i - j)`` (0 for future keys, masked anyway)."""
    return -slopes.view(1, -1, 1, 1) * distance.clamp(min=0).to(torch.float32)


# ------------------------------------------------------------------------------- rpe
def relative_position_bucket(
    distance: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5 bucket of the causal distance ``i - j`` (negative distances fall in bucket 0)."""
    n = distance.clamp(min=0)
    exact = num_buckets // 2
    scaled = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = exact + (scaled * (num_buckets - exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, large)


class RelativePositionBias(nn.Module):
    """T5-style learned relative position bias, one table shared by all layers.

    The ``[num_buckets, heads]`` table is split along the heads over the tensor-parallel group
    (initialized as a full table from the current RNG, then sliced, like the parallel layers).
    """

    def __init__(
        self,
        *,
        num_buckets: int,
        max_distance: int,
        num_heads: int,
        state: ParallelState,
        init_method: InitFn,
    ) -> None:
        super().__init__()
        if num_heads % state.tp_size:
            raise ValueError(f"{num_heads} heads do not split over tensor parallel {state.tp_size}")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        full = master_weight((num_buckets, num_heads), init_method)
        shard = split_tensor(full, 1, state.tp_size, state.tp_rank)
        self.relative_attention_bias = nn.Embedding(
            num_buckets, shard.shape[1], _weight=shard.contiguous()
        )
        set_tensor_parallel_attributes(
            self.relative_attention_bias.weight, state.tp_size > 1, 1, 1
        )

    def forward(self, q_len: int, k_len: int, start_pos: int = 0) -> torch.Tensor:
        """``[1, local heads, q_len, k_len]`` bias for queries at ``start_pos + [0, q_len)``."""
        weight = self.relative_attention_bias.weight
        distance = query_key_distance(q_len, k_len, start_pos, weight.device)
        buckets = relative_position_bucket(distance, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


# ------------------------------------------------------------------------ sinusoidal
def sinusoidal_embedding(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., dim]`` fp32 sinusoidal encodings of ``position_ids`` (``dim`` even)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                device=position_ids.device) / dim))
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
