"""Per-parameter statistics for the logs: parameter norms, gradient norms, the percentage of
zero gradients and optimizer-state norms (``log_param_norm``, ``log_grad_norm``,
``log_grad_pct_zeros``, ``log_optimizer_states``).

Every value is over the full parameter: ZeRO partitions are assembled with DeepSpeed's
``safe_get_full_*`` helpers (collectives over the data-parallel group), and tensor-parallel
shards are summed over the tensor-parallel group (a replicated parameter counts once). Tag
names are GPT-NeoX's: ``parameter_norms/<name>``, ``gradient_norms/<name>``,
``pct_grad_zeros/<name>`` and ``optimizer_state_norms/<index>_<state>`` (the index of the
parameter in the optimizer's parameter order; ``step`` is left out).

Every rank must call the methods at the same points: they are collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron.parallel.layers import is_tensor_parallel
from megatron.parallel.state import ParallelState


@dataclass
class ModelStats:
    """What to log, and the trainable parameters in the optimizer's order."""

    named_params: list[tuple[int, str, torch.nn.Parameter]]  # (optimizer index, name, param)
    state: ParallelState
    param_norm: bool = False
    grad_norm: bool = False
    grad_pct_zeros: bool = False
    optimizer_states: bool = False
    optimizer: torch.optim.Optimizer | None = None  # the torch optimizer (its state keys)
    engine_optimizer: object = None  # DeepSpeed's wrapper (ZeRO), set once it is built

    @classmethod
    def build(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
              state: ParallelState, **flags: bool) -> ModelStats:
        """Record the parameter order of ``optimizer`` (before DeepSpeed wraps it)."""
        names = {id(p): n for n, p in module.named_parameters()}
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        offset = 0  # pipeline stages number their parameters one after the other
        if state.pp_group is not None and state.pp_size > 1:
            counts: list[int] = [0] * state.pp_size
            torch.distributed.all_gather_object(counts, len(ordered), group=state.pp_group)
            offset = sum(counts[:state.pp_rank])
        named = [(offset + i, names.get(id(p), f"param{i}"), p) for i, p in enumerate(ordered)]
        return cls(named, state, optimizer=optimizer, **flags)

    def _all_stages(self, values: dict[str, float]) -> dict[str, float]:
        """Every pipeline stage's values (each stage holds its own layers' parameters)."""
        if self.state.pp_group is None or self.state.pp_size == 1:
            return values
        parts: list[dict[str, float]] = [{} for _ in range(self.state.pp_size)]
        torch.distributed.all_gather_object(parts, values, group=self.state.pp_group)
        return {k: v for part in parts for k, v in part.items()}

    @property
    def wants_grads(self) -> bool:
        return self.grad_norm or self.grad_pct_zeros

    def _reduce(self, rows: list[list[float]], split: list[bool]) -> torch.Tensor:
        """Sum rows over the tensor-parallel group: shards add up; a replicated parameter
        contributes once (from tensor rank 0)."""
        values = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1)
        group = self.state.tp_group
        if group is None or torch.distributed.get_world_size(group) == 1:
            return values
        if self.state.tp_rank != 0:
            keep = torch.tensor(split, dtype=torch.bool)
            values[~keep] = 0.0
        torch.distributed.all_reduce(values, group=group)
        return values

    def _collect(self, get: Callable[[torch.nn.Parameter], torch.Tensor | None],
                 zeros: bool = False) -> dict[str, tuple[float, float, float]]:
        """(sum of squares, zero count, element count) of ``get(param)`` per name."""
        rows, split, names = [], [], []
        for _, name, p in self.named_params:
            t = get(p)  # collective under ZeRO: called for every parameter on every rank
            if t is None:
                continue
            t = t.detach().float()
            rows.append([float(t.pow(2).sum()), float((t == 0).sum()) if zeros else 0.0,
                         float(t.numel())])
            split.append(is_tensor_parallel(p))
            names.append(name)
        if not rows:
            return {}
        values = self._reduce(rows, split).tolist()
        return {n: (v[0], v[1], v[2]) for n, v in zip(names, values)}

    def grad_values(self, loss_scale: float = 1.0) -> dict[str, float]:
        """After the last backward of a step, before the update; ``loss_scale`` divides the
        (fp16, still scaled) gradients."""
        if not self.wants_grads:
            return {}
        from deepspeed.utils import safe_get_full_grad

        out: dict[str, float] = {}
        for name, (sq, nz, n) in self._collect(safe_get_full_grad,
                                               zeros=self.grad_pct_zeros).items():
            if self.grad_norm:
                out[f"gradient_norms/{name}"] = sq ** 0.5 / loss_scale
            if self.grad_pct_zeros:
                out[f"pct_grad_zeros/{name}"] = 100.0 * nz / max(1.0, n)
        return self._all_stages(out)

    def param_values(self) -> dict[str, float]:
        """After the update."""
        out: dict[str, float] = {}
        if self.param_norm:
            from deepspeed.utils import safe_get_full_fp32_param

            def full(p: torch.nn.Parameter) -> torch.Tensor:
                hp = safe_get_full_fp32_param(p)
                return hp if hp is not None else p

            for name, (sq, _, _) in self._collect(full).items():
                out[f"parameter_norms/{name}"] = sq ** 0.5
        if self.optimizer_states:
            out.update(self._optimizer_values())
        return self._all_stages(out)

    def _state_keys(self) -> list[str]:
        keys: set[str] = set()
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                keys.update(k for k, v in st.items()
                            if k != "step" and isinstance(v, torch.Tensor) and v.dim() > 0)
        return sorted(keys)

    def _relink_zero_states(self) -> None:
        """ZeRO 1/2 point each parameter at its slice of the optimizer state once, right
        after the first parameter group's first update, when the other groups have no state
        yet; point them again now that every group has it."""
        zero = self.engine_optimizer
        relink = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if relink is not None and hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            relink()

    def _optimizer_values(self) -> dict[str, float]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._relink_zero_states()
        keys = self._state_keys()
        if self.state.dp_group is not None and torch.distributed.get_world_size() > 1:
            # every rank asks for the same states (a rank may hold no partition state)
            gathered: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, keys)
            keys = sorted({k for ks in gathered for k in ks})
        out: dict[str, float] = {}
        for key in keys:
            def get(p: torch.nn.Parameter, key: str = key) -> torch.Tensor | None:
                full = safe_get_full_optimizer_state(p, key)
                if full is not None:
                    return full
                st = self.optimizer.state.get(p) if self.optimizer is not None else None
                return None if st is None else st.get(key)

            sums = self._collect(get)
            for i, name, _ in self.named_params:
                if name in sums:
                    out[f"optimizer_state_norms/{i}_{key}"] = sums[name][0] ** 0.5
        return out
