"""Pure PyTorch recurrences of the state-space layers, each in two forms that give the same
numbers: a step-by-step reference and a chunked form (exact: no approximation, only a
different order of the same sums) that does the work of a chunk in a few tensor operations.

* :func:`selective_scan_ref` / :func:`selective_scan_chunked` -- Mamba's selective scan (S6),
  the chunked form a log-depth parallel scan inside each chunk::

      dt_t = softplus(dt_t + dt_bias)
      h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t          h: [batch, channels, state]
      y_t  = <C_t, h_t> + D * x_t,   then   y_t * silu(z_t)

* :func:`causal_conv` -- the depthwise causal convolution in front of the scan, continuing
  from the last ``kernel - 1`` inputs of an earlier call.

* :func:`wkv6_ref` / :func:`wkv6_chunked` -- RWKV-6's time-mix recurrence per head (the
  chunked form sums a chunk's pairs of steps with decays from direct segment sums)
  (``S`` a ``[head_size, head_size]`` matrix, ``w_t = exp(-exp(decay_t))`` per key channel)::

      y_t = r_t (diag(u) k_t^T v_t + S_{t-1});   S_t = diag(w_t) S_{t-1} + k_t^T v_t

All of them compute in fp32 and accept an initial state, and return the final state, so
generation continues where the prompt stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------ conv
def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    past: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution: ``x [b, d, l]``, ``weight [d, 1, k]``.

    ``past [b, d, k - 1]`` holds the inputs before ``x`` (zeros when None). Returns the output
    ``[b, d, l]`` and the last ``k - 1`` inputs (the state for the next call)."""
    k = weight.shape[-1]
    if past is None:
        past = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    full = torch.cat([past.to(x.dtype), x], dim=-1)
    out = F.conv1d(full, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                   groups=x.shape[1])
    return out, full[..., full.shape[-1] - (k - 1):]


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """``seg[..., t, s, :] = sum of log_decay[..., r, :] for s < r <= t`` (0 where s >= t)
    from ``log_decay [..., c, n]``: every entry a direct sum of its own terms, so no
    difference of two long running sums loses digits."""
    c = log_decay.shape[-2]
    later = torch.ones(c, c, dtype=torch.bool, device=log_decay.device).tril(-1)  # r > s
    terms = log_decay.unsqueeze(-2) * later[..., None].to(log_decay.dtype)  # [..., r, s, n]
    return terms.cumsum(dim=-3)


# ---------------------------------------------------------------- selective scan
def _scan_inputs(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dt after bias and softplus, log decay dt * A)``, fp32, ``[b, d, l]`` / ``[b, d, l, n]``."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()[None, :, None]
    dt = F.softplus(dt)
    return dt, dt[..., None] * A.float()[None, :, None, :]


def _scan_output(
    y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
) -> torch.Tensor:
    if D is not None:
        y = y + x.float() * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_ref(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan one step at a time. ``x, dt, z [b, d, l]``, ``A [d, n]``, ``B, C [b, n, l]``,
    ``D [d]``, ``state [b, d, n]``. Returns ``(y [b, d, l] fp32, final state [b, d, n])``."""
    b, d, length = x.shape
    dt, log_decay = _scan_inputs(x, dt, A, dt_bias)
    h = x.new_zeros(b, d, A.shape[1], dtype=torch.float32) if state is None else state.float()
    drive = dt[..., None] * x.float()[..., None] * B.float().transpose(1, 2)[:, None]
    ys = []
    for t in range(length):
        h = torch.exp(log_decay[:, :, t]) * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t].float()))
    y = torch.stack(ys, dim=-1) if ys else x.new_zeros(b, d, 0, dtype=torch.float32)
    return _scan_output(y, x, D, z), h


def _linear_scan(decay: torch.Tensor, drive: torch.Tensor, dim: int) -> torch.Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + drive_t`` (``h_{-1} = 0``) along ``dim``, in
    ``ceil(log2(length))`` element-wise steps (Hillis-Steele): after the step with offset
    ``k`` every position holds the recurrence over its last ``2k`` inputs."""
    length = decay.shape[dim]
    offset = 1
    while offset < length:
        prev_drive = drive.narrow(dim, 0, length - offset)
        prev_decay = decay.narrow(dim, 0, length - offset)
        head_drive, tail_drive = drive.split([offset, length - offset], dim)
        head_decay, tail_decay = decay.split([offset, length - offset], dim)
        drive = torch.cat([head_drive, tail_drive + tail_decay * prev_drive], dim)
        decay = torch.cat([head_decay, tail_decay * prev_decay], dim)
        offset *= 2
    return drive


def selective_scan_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, state: torch.Tensor | None = None, chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan, ``chunk`` steps at a time: inside a chunk all states come from a
    log-depth parallel scan (the same products and sums in another order; decays are
    ``exp`` of non-positive numbers, so nothing overflows); the last state starts the next
    chunk."""
    b, d, length = x.shape
    dt, log_decay = _scan_inputs(x, dt, A, dt_bias)
    h = x.new_zeros(b, d, A.shape[1], dtype=torch.float32) if state is None else state.float()
    Bt, Ct = B.float().transpose(1, 2), C.float().transpose(1, 2)  # [b, l, n]
    drive = (dt * x.float())[..., None] * Bt[:, None]  # [b, d, l, n]
    decay = torch.exp(log_decay)
    ys = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        part_decay, part_drive = decay[:, :, start:end], drive[:, :, start:end]
        first = part_decay[:, :, :1] * h[:, :, None] + part_drive[:, :, :1]
        part_drive = torch.cat([first, part_drive[:, :, 1:]], dim=2)
        states = _linear_scan(part_decay, part_drive, dim=2)  # [b, d, c, n]
        ys.append(torch.einsum("bdtn,btn->bdt", states, Ct[:, start:end]))
        h = states[:, :, -1]
    y = torch.cat(ys, dim=-1) if ys else x.new_zeros(b, d, 0, dtype=torch.float32)
    return _scan_output(y, x, D, z), h


# ------------------------------------------------------------------------ WKV-6
def wkv6_ref(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-6 step by step. ``r, k, v, w [b, h, l, n]`` (``w`` the log log-decay: the step's
    decay is ``exp(-exp(w))``), ``u [h, n]``, ``state [b, h, n, n]`` (key x value). Returns
    ``(y [b, h, l, n] fp32, final state)``."""
    b, heads, length, n = r.shape
    r, k, v = r.float(), k.float(), v.float()
    decay = torch.exp(-torch.exp(w.float()))
    s = r.new_zeros(b, heads, n, n) if state is None else state.float()
    uf = u.float()[None, :, :, None]
    ys = []
    for t in range(length):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, :, t], uf * kv + s))
        s = decay[:, :, t, :, None] * s + kv
    y = torch.stack(ys, dim=2) if ys else r.new_zeros(b, heads, 0, n)
    return y, s


def wkv6_chunked(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
    state: torch.Tensor | None = None, chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wkv6_ref` ``chunk`` steps at a time (exact; every decay factor is
    ``exp`` of a non-positive sum)."""
    b, heads, length, n = r.shape
    r, k, v = r.float(), k.float(), v.float()
    log_decay = -torch.exp(w.float())  # [b, h, l, n], <= 0
    s = r.new_zeros(b, heads, n, n) if state is None else state.float()
    uf = u.float()
    ys = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        c = end - start
        rc, kc, vc = r[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        chunk_decay = log_decay[:, :, start:end]
        cum = chunk_decay.cumsum(dim=2)  # through step t, inclusive
        before = torch.cat([torch.zeros_like(cum[:, :, :1]), cum[:, :, :-1]], dim=2)  # t - 1
        # earlier step s < t reaches t decayed by the steps s < r < t: seg[t - 1, s]
        seg = _segment_sums(chunk_decay)  # [b, h, t, s, n]
        diff = torch.cat([torch.zeros_like(seg[:, :, :1]), seg[:, :, :-1]], dim=2)
        strict = torch.ones(c, c, dtype=torch.bool, device=r.device).tril(-1)
        weights = torch.exp(diff.masked_fill(~strict[None, None, :, :, None], float("-inf")))
        scores = torch.einsum("bhti,bhtsi,bhsi->bhts", rc, weights, kc)
        y = torch.einsum("bhts,bhsj->bhtj", scores, vc)
        y = y + (rc * uf[None, :, None] * kc).sum(-1, keepdim=True) * vc  # the bonus term
        y = y + torch.einsum("bhti,bhij->bhtj", rc * torch.exp(before), s)
        ys.append(y)
        tail = torch.exp(seg[:, :, -1])  # from after step s to the chunk's end
        s = torch.exp(cum[:, :, -1])[..., None] * s + torch.einsum(
            "bhsi,bhsj->bhij", kc * tail, vc)
    y = torch.cat(ys, dim=2) if ys else r.new_zeros(b, heads, 0, n)
    return y, s
