"""Cosine logits between unit features and un-normalised class rows, with a lean backward.

``cos = (unit @ rows.T) / ‖rows‖``: dividing the product by the row norms avoids a
normalised copy of the rows.  The backward is written out so that the [c, D] gradient of
the rows is one matrix product plus one in-place correction (autograd's generic graph
would allocate several [N, c] and [c, D] temporaries):

    g' = g / ‖w_j‖
    ∂L/∂unit = g' @ rows
    ∂L/∂w_j  = (g'ᵀ @ unit)_j − w_j · Σ_i g'_ij cos_ij / ‖w_j‖

The [c, D] gradient is the step's largest tensor: written by the product, read again by
the correction and again by the update, it crosses memory three times, more traffic
than any [N, c] step when N < D.  A caller that updates the rows block by block can take
the product's operands and the per-row coefficient instead (:class:`RowCorrection`) and
make each block of the gradient while it updates that block, in cache;
``partial_fc.optim`` does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import native
from .block_threads import BlockThreads
from .rows import Workspace, elements_per_block

_NORM_EPS = 1e-12
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _matmul_dtype(device_type: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool, device: torch.device) -> Iterator[None]:
    """TF32 for these float32 matmuls only (CUDA), restored afterwards; a no-op elsewhere."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, tf32: bool,
        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 ``a @ b`` computed in ``dtype`` (products in ``dtype``, sums in float32).

    ``out``: a float32 buffer for the result (used by float32 products only)."""
    if dtype not in HALF_DTYPES:
        with _tf32_matmuls(tf32, a.device):
            if out is not None and dtype == torch.float32 and a.dtype == b.dtype == torch.float32:
                return torch.mm(a, b, out=out)
            return a.to(dtype) @ b.to(dtype)
    a, b = a.to(dtype), b.to(dtype)
    if a.is_cuda:
        try:  # cuBLAS accumulates in float32; out_dtype also keeps the float32 sums unrounded
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    # CPU (and older CUDA builds): oneDNN/cuBLAS accumulate half-precision products in
    # float32 and round the result once.
    return (a @ b).float()


@dataclass
class RowCorrection:
    """The part of the rows' gradient that the backward left to its caller.

    ``rows`` are the [c, D] rows of the forward.  The backward sets ``coef`` [c]: the true
    gradient of row j is ``grad_j − coef_j · w_j``.  It also leaves out the matrix product
    ``g'ᵀ @ unit`` itself (``product``; the rows then get no ``.grad``): the caller makes
    the gradient block by block (:meth:`gradient_block`), so that each block of the [c, D]
    gradient is computed in cache and used at once instead of crossing memory twice.
    """

    rows: torch.Tensor
    coef: Optional[torch.Tensor] = None
    product: Optional[tuple] = None
    """(g' [N, c], unit [N, D], GEMM dtype, tf32) of a backward whose product is pending."""

    @property
    def pending(self) -> bool:
        """The backward ran and its gradient has not been made yet."""
        return self.product is not None

    def product_block(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """The product part ``g'ᵀ @ unit`` of ``rows``' gradient into float32 ``out`` [len, D]; the
        gradient is ``out − coef[rows] · self.rows[rows]`` (for a caller that applies it itself)."""
        assert self.product is not None and self.coef is not None  # set together by the backward
        g, unit, dtype, tf32 = self.product
        part = _mm(g[:, rows].t(), unit, dtype, tf32, out)
        if part is not out:
            out.copy_(part)
        return out

    def gradient_block(self, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """The complete gradient of ``rows`` (of :attr:`rows`) into float32 ``out`` [len, D]."""
        assert self.coef is not None
        return self.product_block(rows, out).addcmul_(self.rows[rows], self.coef[rows].unsqueeze(1), value=-1.0)

    def clear(self) -> None:
        """Forget the pending gradient (made, or no longer wanted)."""
        self.coef = self.product = None


@dataclass
class SoftmaxHandoff:
    """What the cosines and a fused margin softmax that is their only consumer pass each other.

    On the CPU with :mod:`partial_fc.native` built, the cosine forward leaves its output as the
    raw products ``unit · w`` and sets :attr:`inv_norm`: the softmax's C pass divides, clamps and
    scales them on the fly (:func:`partial_fc.native.margin_sum_rows`) and writes no [N, c]
    tensor of its own.  Its backward then sets the rest and hands back the raw products as the
    cosines' gradient; the cosine backward's C pass recomputes the softmax from them and
    overwrites them with the gradient (:func:`partial_fc.native.softmax_cosine_grad_columns`).
    The [N, c] products cross memory three times in the step instead of seven.  For a head whose
    cosines feed that softmax alone (no filtering, one centre).
    """

    inv_norm: Optional[torch.Tensor] = None
    """1/‖w‖ per column, when the cosine output holds raw products (None: it holds cosines)."""
    scale: float = 0.0
    row_max: Optional[torch.Tensor] = None
    """[N] the maximum the forward's exponentials are relative to (this rank's)."""
    row_scale: Optional[torch.Tensor] = None
    """[N] factor of every exponential of a row, the target's excepted."""
    target: Optional[torch.Tensor] = None
    """[N] int64 target column, −1 where another rank holds the class."""
    target_grad: Optional[torch.Tensor] = None
    """[N] gradient of the target column's cosine."""

    @property
    def raw(self) -> bool:
        return self.inv_norm is not None

    def clear(self) -> None:
        self.inv_norm = self.row_max = self.row_scale = self.target = self.target_grad = None


def row_shares(num_rows: int) -> list[slice]:
    """The rows of an [N, c] tensor in twice as many contiguous parts as torch has threads, for
    C passes on :mod:`partial_fc.block_threads` (a call costs Python dispatch, so few; two per
    thread, so that a thread the scheduler delays leaves its second part to the other)."""
    parts = max(1, min(num_rows, 2 * torch.get_num_threads()))
    per = -(-num_rows // parts)
    return [slice(lo, min(num_rows, lo + per)) for lo in range(0, num_rows, per)]


def row_blocks(shape: tuple) -> list[slice]:
    """Slices of the rows of an [N, c] tensor, each about :func:`partial_fc.rows.elements_per_block`.

    Several elementwise steps over one block run while it is in cache, so the [N, c]
    tensor crosses memory once for all of them instead of once per step.
    """
    n, c = shape
    per = max(1, elements_per_block() // max(1, c))
    return [slice(lo, min(n, lo + per)) for lo in range(0, n, per)]


def _buffer(workspace: Optional[Workspace], name: str, shape: tuple, like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if workspace is None else workspace.get(name, shape, torch.float32, like.device)


class _CosineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor,
                dtype: Optional[torch.dtype], tf32: bool, grad_in_place: bool,
                correction: Optional[RowCorrection], workspace: Optional[Workspace],
                threads: Optional[BlockThreads], handoff: Optional[SoftmaxHandoff]):
        dtype = _matmul_dtype(unit.device.type, dtype)
        inv_norm = norms.reciprocal()
        cos = _mm(unit, rows.t(), dtype, tf32, _buffer(workspace, "cos", (unit.shape[0], rows.shape[0]), unit)).float()
        # Rounding (bf16 products especially) can step outside [-1, 1]; the clamp is not
        # differentiated: the gradient is that of the unclamped cosine.
        if threads is not None and native.can_run_rows(cos, inv_norm):
            if handoff is not None and grad_in_place:
                handoff.inv_norm = inv_norm  # raw products: the softmax's pass divides and clamps
            else:
                threads.run(lambda sl, _ws: native.scale_clamp_rows(cos, inv_norm, sl), row_shares(cos.shape[0]))
        else:
            for sl in row_blocks(tuple(cos.shape)):
                cos[sl].mul_(inv_norm).clamp_(-1.0, 1.0)
        ctx.dtype, ctx.tf32, ctx.grad_in_place, ctx.correction = dtype, tf32, grad_in_place, correction
        ctx.workspace, ctx.threads = workspace, threads
        ctx.handoff = handoff if handoff is not None and handoff.raw else None
        ctx.save_for_backward(unit, rows, inv_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, rows, inv_norm, cos = ctx.saved_tensors
        dtype, tf32 = ctx.dtype, ctx.tf32
        handoff: Optional[SoftmaxHandoff] = ctx.handoff
        in_place = ctx.grad_in_place and grad.dtype == torch.float32 and grad.is_contiguous()
        coef = torch.zeros(cos.shape[1], dtype=torch.float32, device=cos.device) if in_place else None
        c = cos.shape[1]
        share = -(-c // max(1, torch.get_num_threads()))
        column_shares = [slice(lo, min(c, lo + share)) for lo in range(0, c, share)]
        if handoff is not None:
            # The softmax handed back the raw products: one C pass makes g' from them, in place.
            if grad.data_ptr() != cos.data_ptr() or handoff.row_scale is None or coef is None:
                raise RuntimeError("the cosines' gradient is not the fused softmax's hand-off: with a SoftmaxHandoff "
                                   "their only consumer must be partial_fc.margin_softmax")
            g, h, total = grad, handoff, coef
            ctx.threads.run(lambda cols, _ws: native.softmax_cosine_grad_columns(
                g, inv_norm, total, h.scale, h.row_max, h.row_scale, h.target, h.target_grad, cols), column_shares)
            handoff.clear()
        elif coef is not None and ctx.threads is not None and native.can_scale_dot(grad, cos, inv_norm, coef):
            # g' = g / ‖w‖ in place and Σ_i g'_ij cos_ij in one C pass, the columns shared out
            # to the row threads (each column's sum is the same whatever the split).
            g = grad
            ctx.threads.run(lambda cols, _ws: native.scale_dot_columns(g, cos, inv_norm, coef, cols), column_shares)
        elif coef is not None:
            # Block by block while in cache: g' = g / ‖w‖ in place, and Σ_i g'_ij cos_ij.
            g = grad
            blocks = row_blocks(tuple(cos.shape))
            tmp = torch.empty((blocks[0].stop - blocks[0].start, cos.shape[1]), dtype=torch.float32,
                              device=cos.device)
            for sl in blocks:
                part = g[sl].mul_(inv_norm)
                prod = torch.mul(part, cos[sl], out=tmp[:sl.stop - sl.start])
                coef.add_(prod.sum(dim=0))
        else:
            g = grad.float() * inv_norm
        grad_unit = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_unit = _mm(g, rows, dtype, tf32).to(unit.dtype)
        if ctx.needs_input_grad[1]:
            # The correction term stays float32: it is a per-row scalar times the row.
            coef = (coef if coef is not None else (g * cos).sum(dim=0)).mul_(inv_norm)
            correction = ctx.correction
            if correction is not None and not correction.pending:
                # The caller makes the gradient block by block (RowCorrection.gradient_block).
                correction.coef, correction.product = coef, (g.detach(), unit.detach(), dtype, tf32)
            else:
                out = (_buffer(ctx.workspace, "grad_rows", tuple(rows.shape), rows)
                       if rows.dtype == torch.float32 else None)
                grad_rows = _mm(g.t(), unit, dtype, tf32, out).float()
                grad_rows.addcmul_(rows.float(), coef.unsqueeze(1), value=-1.0)
                grad_rows = grad_rows.to(rows.dtype)
        ctx.correction = ctx.workspace = ctx.threads = ctx.handoff = None
        return grad_unit, grad_rows, None, None, None, None, None, None, None, None


def cosine_logits(unit: torch.Tensor, rows: torch.Tensor, norms: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None, tf32: bool = False, grad_in_place: bool = False,
                  correction: Optional[RowCorrection] = None,
                  workspace: Optional[Workspace] = None, threads: Optional[BlockThreads] = None,
                  handoff: Optional[SoftmaxHandoff] = None) -> torch.Tensor:
    """[N, c] float32 cosine of unit features [N, D] with rows [c, D] (any norm).

    ``norms``: the rows' :func:`row_norms` when the caller has them already (one pass over
    the rows fewer); computed here otherwise.  ``dtype``: the GEMMs' compute dtype, forward
    and backward (float32, bfloat16 or float16; products in it, sums in float32); None: the
    autocast dtype when autocast is on, float32 otherwise.  ``tf32``: float32 GEMMs may use
    TF32 tensor cores (CUDA only; restored after each GEMM).  ``grad_in_place``: the
    gradient reaching the cosines is a buffer nobody else reads (the fused margin softmax's)
    and may be overwritten.  ``correction``: leave the rows' gradient to this
    :class:`RowCorrection` (its product operands and ``− coef·w`` term; float32 rows only).
    ``workspace``: buffers kept between steps for the cosines and the rows' gradient (float32
    products): the next call with the same workspace overwrites them, so it is for the one
    forward of a training step whose backward runs before the next step's forward.
    ``threads``: the row threads that run the in-place backward's C pass
    (:func:`partial_fc.native.scale_dot_columns`) and the forward's scale-and-clamp pass on the
    CPU; None keeps torch's ops.  ``handoff``: shared with a fused margin softmax that is the
    cosines' only consumer (``grad_in_place`` too): the output may then hold the raw products,
    for that softmax alone (:class:`SoftmaxHandoff`).
    """
    if correction is not None and rows.dtype != torch.float32:
        raise ValueError(f"a deferred row correction needs float32 rows, got {rows.dtype}")
    return _CosineLogits.apply(unit, rows, row_norms(rows) if norms is None else norms, dtype, tf32,
                               bool(grad_in_place), correction, workspace, threads, handoff)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖w‖ of each row (float32, no gradient: margins that use it get it as a value)."""
    return rows.detach().float().norm(dim=1).clamp_min(_NORM_EPS)
