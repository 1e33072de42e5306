"""Optimisers for the classifier shard that touch only the rows sampled in the step.

Policy (as in PLSC's sparse momentum): a row's weight, momentum and Adam moments change
only in steps where the row was sampled (a positive or a sampled negative).  An unsampled
class therefore neither moves under stale momentum nor decays.  With ``sample_rate = 1``
every row is sampled every step, and the update equals ``torch.optim.SGD`` /
``torch.optim.AdamW`` exactly.

Bytes per class per rank (D = 512): weight + momentum (SGD) = 2·4·D = 4 KiB in float32,
2 KiB in bfloat16 (``param_dtype=torch.bfloat16``: state is stored in bfloat16 too; the
weight and AdamW's moments are written back with stochastic rounding so that small updates
are not lost on average, SGD's momentum buffer rounds to nearest while momentum <= 0.99,
where no step's change to it is that small);
AdamW keeps two moments and a per-row step counter: 3·4·D + 4 bytes in float32.
Per step: the sampled rows and their gradient, ≈ 2·4·D·r bytes per class; the float32 copy
of the rows is a buffer kept between steps (``partial_fc.rows``), the gradient is transient.

Rows that a step does not sample follow ``row_decay`` (:mod:`partial_fc.row_decay`):
``"sampled"`` (above: no change at all) or ``"lazy_dense"`` (the weight decay of the missed
steps is applied when the row is next sampled; 8 more bytes per class).  Each step also
advances the margin's per-step state (:meth:`partial_fc.margins.base.Margin.advance`:
SphereFace/L-Softmax λ, ElasticFace's draws), so that it follows optimiser steps whatever
the gradient accumulation.

The sparse update runs block by block (``partial_fc.rows.blocks``): each block of rows gets
its gradient product (``partial_fc.cosine.RowCorrection``) while in cache, then is updated
and written back.  SGD on the CPU runs the C row kernel (:mod:`partial_fc.native`): one
loop per row reads the stored weight and momentum, applies the gradient correction, the
update and the bf16 rounding, and writes both back.  Elsewhere (no C compiler, a GPU,
sub-centres) and for AdamW the same update runs as torch ops: rows gathered (the weight
from the forward's copy), torch.optim's elementwise update (SGD through the kernel of
``SGD(fused=True)``), rounding, scatter.  Both give the same bits.  The blocks do not
depend on the thread count, so neither does the result.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native
from .block_threads import BlockFn
from .cosine import RowCorrection
from .head import PartialFC
from .row_decay import ROW_DECAY_POLICIES, LazyRowDecay
from .rows import Workspace, blocks, copy_rows_, core_block_elements, gather_rows, round_to_bf16_, rounding_noise


def _stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Round finite float32 ``x`` to bfloat16 up or down with probability given by the remainder.

    ``x`` is overwritten (it is a scratch copy of the rows); the noise is that of
    :func:`partial_fc.rows.rounding_noise`, rows being the first dimension.
    """
    rows = x.contiguous().view(x.shape[0] if x.dim() else 1, -1)
    row, col = rounding_noise(rows.shape[0], rows.shape[1], gen, x.device)
    out = torch.empty(rows.shape, dtype=torch.bfloat16, device=x.device)
    return round_to_bf16_(rows, row, col, out).view(x.shape)


class _RowOptimizer(torch.optim.Optimizer):
    """Shared machinery: fetch the head's row gradients, update those rows and their state."""

    state_names: tuple[str, ...] = ()
    updates_partial_fc_rows = True  # what partial_fc.guard looks for

    def __init__(self, head: PartialFC, defaults: dict, seed: int = 0, row_decay: str = "sampled"):
        if row_decay not in ROW_DECAY_POLICIES:
            raise ValueError(f"row_decay={row_decay!r} is not one of {', '.join(ROW_DECAY_POLICIES)}")
        params = [head.weight] + ([head.bias] if head.bias is not None else [])
        super().__init__(params, defaults)
        self.head = head
        self.row_decay = row_decay
        self.lazy_decay: Optional[LazyRowDecay] = None
        if row_decay == "lazy_dense":
            self.lazy_decay = LazyRowDecay(head.num_local, head.weight.device)
        head.lazy_decay = self.lazy_decay
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

    @torch.no_grad()
    def step(self, closure=None, grad_scale: float = 1.0):  # noqa: D401 - torch signature
        """Update the sampled rows; ``grad_scale`` multiplies the gradients first (1/loss scale)."""
        loss = closure() if closure is not None else None
        index, w_grad, pending, b_grad = self.head.pending_row_grads()
        if w_grad is None and pending is None:
            return loss
        group = self.param_groups[0]
        gathered = self.head.gathered_weight_rows()
        lazy = self.lazy_decay
        # The decay the chosen rows owe (lazy_dense); the forward's copy already carries it.
        owed = lazy.factors(index) if lazy is not None and index is not None else None
        for p, grad, rows, deferred in zip(group["params"], (w_grad, b_grad), (gathered, None), (pending, None)):
            if grad is None and deferred is None:
                continue
            # The gradient buffers are discarded after the step, so they are updated in place.
            grad = None if grad is None else grad.float()
            state = self._param_state(p)
            if index is None and p.dtype == torch.float32 and grad is not None:
                # Dense float32 rows are updated where they live (torch.optim's update).
                if grad_scale != 1.0:
                    grad.mul_(grad_scale)
                self._update({"param": p.detach(), **{n: state[n] for n in self.state_names}}, grad, group)
            else:
                self._sparse_update(p.detach(), state, index, grad, rows, group, grad_scale,
                                    owed, deferred)
        if pending is not None:
            pending.clear()
        if lazy is not None:
            lazy.advance(group["lr"], group["weight_decay"], index)
        self.head.margin.advance()
        return loss

    @torch.no_grad()
    def flush_row_decay(self) -> None:
        """Apply the decay every row owes (lazy_dense) now: the shard then equals dense SGD's (momentum 0)."""
        lazy = self.lazy_decay
        if lazy is None:
            return
        factors = lazy.factors(None)
        for p in self.param_groups[0]["params"]:
            scaled = p.detach().float() * factors.view((-1,) + (1,) * (p.dim() - 1))
            p.detach().copy_(scaled)
        lazy.mark.fill_(lazy.total)

    def _sparse_update(self, param: torch.Tensor, state: dict, index: Optional[torch.Tensor],
                       grad: Optional[torch.Tensor], rows: Optional[torch.Tensor], group: dict,
                       grad_scale: float, owed: Optional[torch.Tensor] = None,
                       pending: Optional[RowCorrection] = None) -> None:
        """Gather, update and write back the chosen rows of ``param`` and its state, block by block.

        ``rows``: the float32 copy of the chosen weight rows made by the forward (None:
        gathered here).  ``owed``: [rows] decay factor of the stored rows (lazy_dense), applied
        to rows gathered here (the forward's copy has it already).  Each block of rows is
        gathered, updated and written back while it is in cache, so weight and state cross
        memory once each way.  ``pending`` (with ``grad``
        None): the gradient still to be made (``PartialFC.pending_row_grads``), block by block
        just before each block's update, so that it is used while in cache.
        """
        shaped = grad if grad is not None else rows
        assert shaped is not None, "a pending gradient comes with the forward's rows"
        n = shaped.shape[0]
        width = shaped[0].numel() if shaped.dim() > 1 else 1
        centers = self.head.num_centers
        dev = param.device
        names = ("param",) + self.state_names
        targets = {name: param if name == "param" else state[name] for name in names}
        bf16 = [name for name, t in targets.items() if t.dtype == torch.bfloat16 and t.shape == param.shape]
        # One row draw and one column draw per stochastically rounded tensor and step (see
        # partial_fc.rows); the others round to nearest.
        noise = {name: rounding_noise(n, width, self.rounding_generator, dev) for name in bf16
                 if self._rounds_stochastically(name, group)}
        per = core_block_elements()
        native_block = self._native_block(param, state, index, grad, group, grad_scale, owed, pending, noise)
        if native_block is not None:
            self.head.block_threads.run(native_block, list(blocks(n, width, per)), None if dev.type == "cpu" else 1)
            return

        def update_block(sl: slice, ws: Workspace) -> None:
            part = None if index is None else index[sl]
            count = sl.stop - sl.start
            block = {}
            for name, source in targets.items():
                if name == "param" and rows is not None:
                    block[name] = rows[sl]
                    continue
                shape = (count,) + tuple(source.shape[1:])
                src = source[sl] if index is None else source
                block[name] = gather_rows(src, part, ws.get(name, shape, torch.float32, dev), ws, per)
                if name == "param" and owed is not None:
                    block[name].mul_(owed[sl].view((-1,) + (1,) * (len(shape) - 1)))
            if pending is None:
                assert grad is not None
                g = grad[sl]
            else:  # made from the rows before the update changes them
                g = ws.get("grad", (count, width), torch.float32, dev)
                pending.gradient_block(slice(sl.start * centers, sl.stop * centers), g.view(count * centers, -1))
            if grad_scale != 1.0:
                g.mul_(grad_scale)
            self._update(block, g, group)
            for name, value in block.items():
                target = targets[name]
                if name in noise:
                    row, col = noise[name]
                    flat = value.view(count, -1)
                    out = ws.get("bf16", flat.shape, torch.bfloat16, dev)
                    value = round_to_bf16_(flat, row[sl], col, out,
                                           ws.get("noise", flat.shape, torch.int32, dev)).view(value.shape)
                elif target.dtype != value.dtype:
                    value = ws.get("bf16", value.shape, target.dtype, dev).copy_(value)
                if index is None:
                    target[sl].copy_(value)
                else:
                    copy_rows_(target, part, value.to(target.dtype))

        # Cache-sized blocks on one core each (partial_fc.block_threads), on the CPU; a GPU
        # runs the same loop in order, its kernels being asynchronous.  For the weight these
        # are PartialFC.update_blocks, in which the head makes a pending gradient when asked.
        self.head.block_threads.run(update_block, list(blocks(n, width, per)), None if dev.type == "cpu" else 1)

    def _update(self, rows: dict, grad: torch.Tensor, group: dict) -> None:  # pragma: no cover
        """Update ``rows`` (param and state, float32) in place from ``grad``."""
        raise NotImplementedError

    def _native_block(self, param: torch.Tensor, state: dict, index: Optional[torch.Tensor],
                      grad: Optional[torch.Tensor], group: dict, grad_scale: float,
                      owed: Optional[torch.Tensor], pending: Optional[RowCorrection],
                      noise: dict) -> Optional[BlockFn]:
        """A block update of :meth:`_sparse_update` by the C row kernels (:mod:`partial_fc.native`),
        or None where they do not apply: the torch ops then run."""
        return None

    def _rounds_stochastically(self, name: str, group: dict) -> bool:
        """Whether bfloat16 rows ``name`` ("param" or a state) are written back with stochastic
        rounding (else to nearest): the weight always, the state unless an optimiser knows
        that no step's change to it falls below bfloat16's resolution."""
        return True

    # ------------------------------------------------------------ re-sharding support
    def state_rows(self) -> dict[str, torch.Tensor]:
        """Every row-aligned state tensor, named ``"<weight|bias>.<state>"`` ([num_local, ...]).

        Under lazy_dense, ``weight.decay_owed`` is the log of the decay each row owes (a copy).
        """
        out = {}
        for pname, p in zip(("weight", "bias"), self.param_groups[0]["params"]):
            state = self._param_state(p)
            for name, value in state.items():
                out[f"{pname}.{name}"] = value
        if self.lazy_decay is not None:
            out[_OWED] = self.lazy_decay.owed()
        return out

    def load_state_rows(self, rows: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_rows` returned (possibly re-sliced for another world size).

        Rows saved without lazy_dense owe nothing; a saved debt is dropped by ``sampled``.
        """
        if self.lazy_decay is not None:
            if _OWED in rows:
                self.lazy_decay.load_owed(rows[_OWED])
            else:
                self.lazy_decay.mark.fill_(self.lazy_decay.total)
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


_OWED = "weight.decay_owed"


def _noise_block(noise: Optional[tuple], sl: slice) -> Optional[tuple]:
    """The rounding draws of one block of rows: its row draws, every column draw."""
    return None if noise is None else (noise[0][sl], noise[1])


# The kernel behind torch.optim.SGD(fused=True) (CPU and CUDA); None where a build lacks it.
_FUSED_SGD = getattr(torch, "_fused_sgd_", None)
# Elements of the widest CPU vector registers (64 floats = 2048 bits, SVE's largest).
_WHOLE_VECTORS = 64


class PartialFCSGD(_RowOptimizer):
    """SGD with momentum and L2 weight decay on the sampled rows (torch.optim.SGD's update)."""

    state_names = ("momentum_buffer",)

    def __init__(self, head: PartialFC, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 nesterov: bool = False, seed: int = 0, row_decay: str = "sampled"):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    nesterov=nesterov), seed, row_decay)

    def _rounds_stochastically(self, name, group):
        # The momentum buffer changes each step by at least 1 − momentum of itself (its decay)
        # and settles at grad / (1 − momentum): with momentum <= 0.99 both are above bf16's
        # worst relative half-step (2^-8 = 0.4%), so rounding to nearest loses no step.
        # Closer to 1 the decay of a step could round away, and the draw is needed.
        return name != "momentum_buffer" or group["momentum"] > 0.99

    def _native_block(self, param, state, index, grad, group, grad_scale, owed, pending, noise):
        # One C loop per row: gather, correction, SGD, rounding and scatter of weight and momentum
        # (the torch ops below are a dozen passes over each block).  CPU rows of one centre only.
        buf = state["momentum_buffer"]
        if (param.device.type != "cpu" or param.dim() != 2 or self.head.num_centers != 1
                or param.dtype not in (torch.float32, torch.bfloat16) or buf.dtype != param.dtype
                or not (param.is_contiguous() and buf.is_contiguous()) or native.library() is None):
            return None
        grad = None if grad is None else grad.contiguous()
        width = param.shape[1]
        hyper = dict(lr=group["lr"], momentum_factor=group["momentum"], weight_decay=group["weight_decay"],
                     nesterov=group["nesterov"], scale=grad_scale)

        def block(sl: slice, ws: Workspace) -> None:
            if pending is None:
                assert grad is not None
                g, coef = grad[sl], None
            else:  # the product here, its correction in the kernel
                g = pending.product_block(sl, ws.get("grad", (sl.stop - sl.start, width), torch.float32, param.device))
                coef = None if pending.coef is None else pending.coef[sl]
            # Without an index the rows are the first ones: the kernel gets the block's own rows.
            target, momentum, part = (param, buf, index[sl]) if index is not None else (param[sl], buf[sl], None)
            # The weight rows are read from storage, not from the forward's float32 copy (equal
            # values): writing them back reads their cache lines anyway, the copy would be extra.
            native.sgd_rows(target, momentum, part, g, owed=None if owed is None else owed[sl], coef=coef,
                            weight_noise=_noise_block(noise.get("param"), sl),
                            momentum_noise=_noise_block(noise.get("momentum_buffer"), sl),
                            scratch=ws.get("sgd", (3 * width,), torch.float32, param.device), **hyper)
        return block

    def _update(self, rows, grad, group):
        w, buf = rows["param"], rows["momentum_buffer"]
        if (group["momentum"] and _FUSED_SGD is not None and grad.numel() % _WHOLE_VECTORS == 0
                and w.is_contiguous() and buf.is_contiguous() and grad.is_contiguous()):
            # torch.optim.SGD(fused=True)'s kernel: the same update in one pass over weight,
            # momentum and gradient instead of four.  Its vector body rounds as the ops below
            # do, its scalar tail does not: it gets whole vectors only, so the result is the
            # same bit for bit whichever path runs (and whatever the blocking).
            _FUSED_SGD([w], [grad], [buf], weight_decay=group["weight_decay"], momentum=group["momentum"],
                       lr=group["lr"], dampening=0.0, nesterov=group["nesterov"], maximize=False,
                       is_first_step=False)
            return
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
                 weight_decay: float = 1e-2, seed: int = 0, row_decay: str = "sampled"):
        if lr < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"lr={lr}, betas={betas}, weight_decay={weight_decay} are out of range")
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), seed, row_decay)

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
                         seed: int = 0, row_decay: str = "sampled") -> _RowOptimizer:
    """The row optimiser for ``head``: ``"sgd"`` (momentum) or ``"adamw"``.

    ``row_decay``: what happens to rows a step does not sample, ``"sampled"`` (nothing) or
    ``"lazy_dense"`` (their weight decay is applied when next sampled); see
    :mod:`partial_fc.row_decay`.
    """
    name = name.lower()
    if name == "sgd":
        return PartialFCSGD(head, lr=lr, momentum=momentum, weight_decay=weight_decay, seed=seed,
                            row_decay=row_decay)
    if name == "adamw":
        return PartialFCAdamW(head, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, seed=seed,
                              row_decay=row_decay)
    raise ValueError(f"unknown head optimizer {name!r}: use 'sgd' or 'adamw'")


__all__ = ["PartialFCSGD", "PartialFCAdamW", "build_head_optimizer"]
