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

from typing import Optional

import torch

_NORM_EPS = 1e-12


def _matmul_dtype(device_type: str) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.float32


class _CosineLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unit: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor):
        dtype = _matmul_dtype(unit.device.type)
        inv_norm = norms.reciprocal()
        cos = (unit.to(dtype) @ rows.to(dtype).t()).float()
        cos.mul_(inv_norm)
        # Rounding (bf16 products especially) can step outside [-1, 1]; the clamp is not
        # differentiated: the gradient is that of the unclamped cosine.
        cos.clamp_(-1.0, 1.0)
        ctx.dtype = dtype
        ctx.save_for_backward(unit, rows, inv_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, rows, inv_norm, cos = ctx.saved_tensors
        dtype = ctx.dtype
        g = grad.float() * inv_norm
        grad_unit = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_unit = (g.to(dtype) @ rows.to(dtype)).to(unit.dtype)
        if ctx.needs_input_grad[1]:
            coef = torch.einsum("ij,ij->j", g, cos).mul_(inv_norm)
            grad_rows = (g.t().to(dtype) @ unit.to(dtype)).float()
            grad_rows.addcmul_(rows.float(), coef.unsqueeze(1), value=-1.0)
            grad_rows = grad_rows.to(rows.dtype)
        return grad_unit, grad_rows, None


def cosine_logits(unit: torch.Tensor, rows: torch.Tensor, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, c] float32 cosine of unit features [N, D] with rows [c, D] (any norm).

    ``norms``: the rows' :func:`row_norms` when the caller has them already (one pass over
    the rows fewer); computed here otherwise.
    """
    return _CosineLogits.apply(unit, rows, row_norms(rows) if norms is None else norms)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """‖w‖ of each row (float32, no gradient: margins that use it get it as a value)."""
    return rows.detach().float().norm(dim=1).clamp_min(_NORM_EPS)
