"""Optimisers for the classifier shard that touch only the rows sampled in the step.

Policy (as in PLSC's sparse momentum): a row's weight, momentum and Adam moments change
only in steps where the row was sampled (a positive or a sampled negative).  An unsampled
class therefore neither moves under stale momentum nor decays.  With ``sample_rate = 1``
every row is sampled every step, and the update equals ``torch.optim.SGD`` /
``torch.optim.AdamW`` exactly.

Bytes per class per rank (D = 512): weight + momentum (SGD) = 2·4·D = 4 KiB in float32,
2 KiB in bfloat16 (``param_dtype=torch.bfloat16``: state is stored in bfloat16 too,
written back with stochastic rounding so small updates are not lost on average);
AdamW keeps two moments and a per-row step counter: 3·4·D + 4 bytes in float32.
Transient per step: the sampled rows and their gradient, ≈ 2·4·D·r bytes per class.
"""
from __future__ import annotations

from typing import Optional

import torch

from .head import PartialFC


def _rounding_noise(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Uniform integers in [0, 2^16): the bits dropped when float32 becomes bfloat16."""
    return torch.randint(0, 1 << 16, shape, generator=gen, device=device, dtype=torch.int32)


def _stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator,
                           noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round finite float32 to bfloat16 up or down with probability given by the remainder.

    ``x`` is overwritten (it is a scratch copy of the rows).  Adding uniform noise below the
    kept bits and truncating rounds up exactly with the probability of the dropped fraction.
    """
    if noise is None:
        noise = _rounding_noise(x.shape, gen, x.device)
    bits = x.contiguous().view(torch.int32)
    bits.add_(noise).bitwise_and_(-65536)  # keep the upper 16 bits: the bf16 value, exactly
    return bits.view(torch.float32).to(torch.bfloat16)


class _RowOptimizer(torch.optim.Optimizer):
    """Shared machinery: fetch the head's row gradients, update those rows and their state."""

    state_names: tuple[str, ...] = ()

    def __init__(self, head: PartialFC, defaults: dict, seed: int = 0):
        params = [head.weight] + ([head.bias] if head.bias is not None else [])
        super().__init__(params, defaults)
        self.head = head
        # The bf16 stochastic-rounding stream; checkpoints save its state for an exact resume.
        self.rounding_generator = torch.Generator(device=head.weight.device)
        self.rounding_generator.manual_seed(seed + 17 * head.rank)

    def _param_state(self, p: torch.nn.Parameter) -> dict:
        state = self.state[p]
        if not state:
            for name in self.state_names:
                state[name] = torch.zeros_like(p)
        return state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the row gradients of the last step."""
        self.head.clear_row_grads()

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """True when every row gradient collected since the last zero_grad is finite."""
        _, w, b = self.head.row_grads()
        ok = w is None or bool(torch.isfinite(w).all())
        return ok and (b is None or bool(torch.isfinite(b).all()))

    def _write(self, target: torch.Tensor, index: Optional[torch.Tensor], value: torch.Tensor,
               noise: Optional[torch.Tensor] = None) -> None:
        if target.dtype == torch.bfloat16:
            value = _stochastic_round_bf16(value, self.rounding_generator, noise)
        else:
            value = value.to(target.dtype)
        if index is None:
            target.copy_(value)
        else:
            target.index_copy_(0, index, value)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0):  # noqa: D401 - torch signature
        """Update the sampled rows; ``grad_scale`` multiplies the gradients first (1/loss scale)."""
        loss = closure() if closure is not None else None
        index, w_grad, b_grad = self.head.row_grads()
        if w_grad is None:
            return loss
        group = self.param_groups[0]
        for p, grad in zip(group["params"], (w_grad, b_grad)):
            if grad is None:
                continue
            # The gradient buffers are discarded after the step, so they are updated in place.
            grad = grad.float()
            if grad_scale != 1.0:
                grad.mul_(grad_scale)
            state = self._param_state(p)
            # Dense float32 rows are updated where they live; otherwise on a float32 copy of the
            # chosen rows, written back afterwards (one gather and one scatter per tensor).
            in_place = index is None and p.dtype == torch.float32
            rows = {"param": p.data if in_place else self._read(p.data, index)}
            for name in self.state_names:
                rows[name] = state[name] if in_place else self._read(state[name], index)
            self._update(rows, grad, group)
            if not in_place:
                # One noise draw serves the weight and its state: each element still rounds
                # without bias, and random numbers are the costliest part of the write.
                noise = (_rounding_noise(rows["param"].shape, self.rounding_generator, p.device)
                         if p.dtype == torch.bfloat16 else None)
                self._write(p.data, index, rows["param"], noise)
                for name in self.state_names:
                    same_shape = noise is not None and rows[name].shape == noise.shape
                    self._write(state[name], index, rows[name], noise if same_shape else None)
        return loss

    @staticmethod
    def _read(tensor: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        rows = tensor if index is None else tensor.index_select(0, index)
        return rows.float()

    def _update(self, rows: dict, grad: torch.Tensor, group: dict) -> None:  # pragma: no cover
        """Update ``rows`` (param and state, float32) in place from ``grad``."""
        raise NotImplementedError

    # ------------------------------------------------------------ re-sharding support
    def state_rows(self) -> dict[str, torch.Tensor]:
        """Every row-aligned state tensor, named ``"<weight|bias>.<state>"`` ([num_local, ...])."""
        out = {}
        for pname, p in zip(("weight", "bias"), self.param_groups[0]["params"]):
            state = self._param_state(p)
            for name, value in state.items():
                out[f"{pname}.{name}"] = value
        return out

    def load_state_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_rows` returned (possibly re-sliced for another world size)."""
        for pname, p in zip(("weight", "bias"), self.param_groups[0]["params"]):
            state = self._param_state(p)
            for name in list(state):
                key = f"{pname}.{name}"
                if key not in rows:
                    raise KeyError(f"optimizer row state {key!r} missing (have {sorted(rows)})")
                if rows[key].shape != state[name].shape:
                    raise ValueError(f"optimizer row state {key!r} has shape {tuple(rows[key].shape)}, "
                                     f"this shard needs {tuple(state[name].shape)}")
                state[name].copy_(rows[key])


class PartialFCSGD(_RowOptimizer):
    """SGD with momentum and L2 weight decay on the sampled rows (torch.optim.SGD's update)."""

    state_names = ("momentum_buffer",)

    def __init__(self, head: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, seed: int = 0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    nesterov=nesterov), seed)

    def _update(self, rows, grad, group):
        w, buf = rows["param"], rows["momentum_buffer"]
        if group["weight_decay"]:
            grad.add_(w, alpha=group["weight_decay"])
        direction = grad
        if group["momentum"]:
            buf.mul_(group["momentum"]).add_(grad)
            direction = grad.add_(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        w.add_(direction, alpha=-group["lr"])


class PartialFCAdamW(_RowOptimizer):
    """AdamW on the sampled rows; bias correction uses each row's own step count."""

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, head: PartialFC, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        if lr < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"lr={lr}, betas={betas}, weight_decay={weight_decay} are out of range")
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), seed)

    def _param_state(self, p):
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        return state

    def _update(self, rows, grad, group):
        beta1, beta2 = group["betas"]
        w, m, v, step = rows["param"], rows["exp_avg"], rows["exp_avg_sq"], rows["step"]
        w.mul_(1 - group["lr"] * group["weight_decay"])
        step.add_(1)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        shape = (-1,) + (1,) * (grad.dim() - 1)
        step_size = (group["lr"] / (1 - beta1 ** step)).view(shape)
        # grad is not needed any more: it becomes the denominator.
        torch.div(v, (1 - beta2 ** step).view(shape), out=grad).sqrt_().add_(group["eps"])
        w.addcdiv_(m * step_size, grad, value=-1.0)


def build_head_optimizer(head: PartialFC, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9,
                         weight_decay: float = 5e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                         seed: int = 0) -> _RowOptimizer:
    """The row optimiser for ``head``: ``"sgd"`` (momentum) or ``"adamw"``."""
    name = name.lower()
    if name == "sgd":
        return PartialFCSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed)
    if name == "adamw":
        return PartialFCAdamW(head, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed)
    raise ValueError(f"unknown head optimizer {name!r}: use 'sgd' or 'adamw'")


__all__ = ["PartialFCSGD", "PartialFCAdamW", "build_head_optimizer"]
