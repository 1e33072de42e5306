"""Cosine logits between unit features and un-normalised class rows, with a lean backward.

``cos = (unit @ rows.T) / ‖rows‖``: dividing the product by the row norms avoids a
normalised copy of the rows.  The backward is written out so that the [c, D] gradient of
the rows is one matrix product plus one in-place correction (autograd's generic graph
would allocate several [N, c] and [c, D] temporaries):

    g' = g / ‖w_j‖
    ∂L/∂unit = g' @ rows
    ∂L/∂w_j  = (g'ᵀ @ unit)_j − w_j · Σ_i g'_ij cos_ij / ‖w_j‖
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

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


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, tf32: bool) -> torch.Tensor:
    """float32 ``a @ b`` computed in ``dtype`` (products in ``dtype``, sums in float32)."""
    if dtype not in HALF_DTYPES:
        with _tf32_matmuls(tf32, a.device):
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


class _CosineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor,
                dtype: Optional[torch.dtype], tf32: bool):
        dtype = _matmul_dtype(unit.device.type, dtype)
        inv_norm = norms.reciprocal()
        cos = _mm(unit, rows.t(), dtype, tf32).float()
        cos.mul_(inv_norm)
        # Rounding (bf16 products especially) can step outside [-1, 1]; the clamp is not
        # differentiated: the gradient is that of the unclamped cosine.
        cos.clamp_(-1.0, 1.0)
        ctx.dtype, ctx.tf32 = dtype, tf32
        ctx.save_for_backward(unit, rows, inv_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, rows, inv_norm, cos = ctx.saved_tensors
        dtype, tf32 = ctx.dtype, ctx.tf32
        g = grad.float() * inv_norm
        grad_unit = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_unit = _mm(g, rows, dtype, tf32).to(unit.dtype)
        if ctx.needs_input_grad[1]:
            # The correction term stays float32: it is a per-row scalar times the row.
            coef = torch.einsum("ij,ij->j", g, cos).mul_(inv_norm)
            grad_rows = _mm(g.t(), unit, dtype, tf32).float()
            grad_rows.addcmul_(rows.float(), coef.unsqueeze(1), value=-1.0)
            grad_rows = grad_rows.to(rows.dtype)
        return grad_unit, grad_rows, None, None, None


def cosine_logits(unit: torch.Tensor, rows: torch.Tensor, norms: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None, tf32: bool = False) -> torch.Tensor:
    """[N, c] float32 cosine of unit features [N, D] with rows [c, D] (any norm).

    ``norms``: the rows' :func:`row_norms` when the caller has them already (one pass over
    the rows fewer); computed here otherwise.  ``dtype``: the GEMMs' compute dtype, forward
    and backward (float32, bfloat16 or float16; products in it, sums in float32); None: the
    autocast dtype when autocast is on, float32 otherwise.  ``tf32``: float32 GEMMs may use
    TF32 tensor cores (CUDA only; restored after each GEMM).
    """
    return _CosineLogits.apply(unit, rows, row_norms(rows) if norms is None else norms, dtype, tf32)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖w‖ of each row (float32, no gradient: margins that use it get it as a value)."""
    return rows.detach().float().norm(dim=1).clamp_min(_NORM_EPS)
