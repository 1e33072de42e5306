"""Margin and sharded softmax cross-entropy in one pass over the [N, c] logits.

Most margins are ``s · cos θ`` in every column except the target one, whose logit is a
function of the target cosine (and of the feature norm for some).  For them the logits
need not exist as an autograd tensor of their own: one [N, c] buffer holds ``s·cos``,
then ``exp(logit − max)``, and in the backward becomes the gradient with respect to the
cosine, in place.  The target column's logit and its derivative are computed by the
margin on [N] tensors (:meth:`Margin.target_logit`), with autograd on those only.

Against the generic path (margin module, then :func:`partial_fc.softmax.sharded_cross_entropy`)
this saves the margin's [N, c] temporaries (scaled copy, one-hot mask, select), the
autograd graph of those and the scattered target gradients, and the normalisation pass
of the softmax (the backward scales each row once instead).  The collectives are the
same: one MAX and one packed SUM all-reduce; the top-1 accuracy (ranked by the logits)
needs nothing more than their results.

On the CPU, where :mod:`partial_fc.native` is built and the cosines feed this softmax alone,
the [N, c] buffer does not exist either: the forward is one C pass per row over the cosine
GEMM's raw products (divided, clamped and scaled on the fly) that keeps only each row's
maximum and sum of exponentials, relative to this rank's maximum (after the MAX all-reduce
each row's sum and softmax take the factor exp(local max − global max), exactly 1 on one
rank); the backward's softmax is recomputed in the cosine backward's pass
(:class:`partial_fc.cosine.SoftmaxHandoff`).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native
from .block_threads import BlockThreads
from .comm import ProcessGroup, all_reduce, rank_and_world
from .cosine import SoftmaxHandoff, row_blocks, row_shares
from .margins.base import Margin, MarginInput
from .rows import Workspace


class _ScaledMarginCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits ``s·cos`` with the target column replaced by the margin's."""

    @staticmethod
    def forward(ctx, cos: torch.Tensor, feature_norm: torch.Tensor, target: torch.Tensor,
                margin: Margin, scale: float, inp: MarginInput, group: ProcessGroup, with_accuracy: bool,
                workspace: Optional[Workspace], threads: Optional[BlockThreads],
                handoff: Optional[SoftmaxHandoff]):
        raw = handoff is not None and handoff.raw  # cos holds unit·w: see partial_fc.cosine.SoftmaxHandoff
        has = target >= 0
        idx = target.clamp(min=0).unsqueeze(1)
        zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
        cos_t = cos.gather(1, idx).squeeze(1)
        if raw:
            assert handoff is not None and handoff.inv_norm is not None and threads is not None
            inv_norm = handoff.inv_norm
            cos_t = cos_t.mul_(inv_norm[idx.squeeze(1)]).clamp_(-1.0, 1.0)  # the C pass's roundings
        # The target logit on [N] leaves: its derivative comes from autograd in the backward.
        with torch.enable_grad():
            cos_leaf = cos_t.detach().requires_grad_()
            norm_leaf = feature_norm.detach().requires_grad_(feature_norm.requires_grad)
            leaf_inp = MarginInput(cos=cos.detach(), target=target, feature_norm=norm_leaf,
                                   weight_norm=inp.weight_norm, bias=inp.bias, group=group)
            t = margin.target_logit(cos_leaf, leaf_inp).to(cos.dtype)
        t_here = torch.where(has, t.detach(), zero)

        row_max = torch.empty(cos.shape[0], dtype=cos.dtype, device=cos.device)
        sum_exp_here = torch.empty_like(row_max)
        if raw:
            # One C pass per row, in cache, writing nothing of [N, c]: logits, the row's maximum
            # here and the sum of exponentials relative to it.  Once the all-reduce gives the
            # global maximum, each row's sum (and in the backward its softmax) takes the factor
            # exp(local max − global max), exactly 1 on one rank.
            target_exp = torch.empty_like(row_max)
            assert threads is not None
            threads.run(lambda sl, _ws: native.margin_sum_rows(cos, inv_norm, scale, target, t_here, row_max,
                                                               sum_exp_here, target_exp, sl), row_shares(cos.shape[0]))
            local_max = row_max.clone() if rank_and_world(group)[1] > 1 else row_max
            all_reduce(row_max, "max", group)
            rescale = None if local_max is row_max else (local_max - row_max).exp_()
            if rescale is not None:
                sum_exp_here.mul_(rescale)
            saved = cos
            ctx.raw = (local_max, target_exp, rescale)
        else:
            # One buffer: s·cos, the target column replaced (rows held elsewhere keep s·cos_t),
            # then exp(logit − max); each pass block by block over rows, in cache.
            buf = (torch.empty_like(cos) if workspace is None
                   else workspace.get("margin_softmax", tuple(cos.shape), cos.dtype, cos.device))
            put = torch.where(has, t_here, cos_t * scale).unsqueeze(1)
            blocks = row_blocks(tuple(cos.shape))
            for sl in blocks:
                part = torch.mul(cos[sl], scale, out=buf[sl])
                part.scatter_(1, idx[sl], put[sl])
                torch.amax(part, dim=1, out=row_max[sl])  # amax: no indices
            all_reduce(row_max, "max", group)
            for sl in blocks:
                part = buf[sl].sub_(row_max[sl].unsqueeze(1)).exp_()
                torch.sum(part, dim=1, out=sum_exp_here[sl])
            saved = buf
            ctx.raw = None
        sums = all_reduce(torch.stack([sum_exp_here, t_here]), "sum", group)
        sum_exp, target_logit = sums[0], sums[1]
        loss = (sum_exp.log() + row_max - target_logit).mean()
        if with_accuracy:
            # Ranked by the logits themselves: the target is top-1 when its logit is the row max.
            accuracy = (target_logit >= row_max).to(torch.float32).mean()
        else:
            accuracy = torch.full((), float("nan"), device=cos.device)
        ctx.mark_non_differentiable(accuracy)
        ctx.scale, ctx.t, ctx.leaves, ctx.handoff = scale, t, (cos_leaf, norm_leaf), handoff if raw else None
        ctx.save_for_backward(saved, sum_exp, target)
        return loss, accuracy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_accuracy: Optional[torch.Tensor]):
        buf, sum_exp, target = ctx.saved_tensors  # raw: the cosines' raw products, not the exponentials
        cos_leaf, norm_leaf = ctx.leaves
        has = target >= 0
        idx = target.clamp(min=0).unsqueeze(1)
        k = grad_loss / buf.shape[0]
        row_scale = k / sum_exp
        if ctx.raw is not None:
            local_max, target_exp, rescale = ctx.raw
            if rescale is not None:  # the exponentials are relative to this rank's maximum
                row_scale = row_scale * rescale
            p_t = target_exp * row_scale
        else:
            p_t = buf.gather(1, idx).squeeze(1) * row_scale
        # d loss / d t = k·(softmax at the target − 1), where this rank holds the target.
        grad_t = torch.where(has, p_t - k, torch.zeros((), dtype=buf.dtype, device=buf.device))
        wanted = [cos_leaf] + ([norm_leaf] if norm_leaf.requires_grad else [])
        grads = torch.autograd.grad(ctx.t, wanted, grad_t, allow_unused=True)
        grad_cos_t = grads[0] if grads[0] is not None else torch.zeros_like(grad_t)
        grad_norm = grads[1] if len(grads) > 1 else None
        if ctx.raw is not None:
            # d loss / d cos = s·k·softmax in every non-target column and grad_cos_t at the
            # target: made by the cosine backward's pass from the raw products handed back.
            h = ctx.handoff
            h.scale, h.row_max, h.row_scale = ctx.scale, local_max, row_scale * ctx.scale
            h.target, h.target_grad = target, grad_cos_t  # target: −1 where another rank holds it
            grad = buf
        else:
            # The saved buffer becomes d loss / d cos = s·k·softmax in every non-target column.
            grad = buf.mul_((row_scale * ctx.scale).unsqueeze(1))
            grad.scatter_(1, idx, torch.where(has, grad_cos_t, grad.gather(1, idx).squeeze(1)).unsqueeze(1))
        ctx.t = ctx.leaves = ctx.handoff = ctx.raw = None
        return grad, grad_norm, None, None, None, None, None, None, None, None, None


def margin_cross_entropy(margin: Margin, inp: MarginInput, accuracy: bool = False,
                         workspace: Optional[Workspace] = None, threads: Optional[BlockThreads] = None,
                         handoff: Optional[SoftmaxHandoff] = None
                         ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mean loss of the global batch, top-1 accuracy or NaN) for a margin of the scaled form.

    Returns None when ``margin`` is not of that form (:meth:`Margin.logit_scale` is None):
    the caller then runs the margin module and :func:`partial_fc.softmax.sharded_cross_entropy`.
    The accuracy ranks the logits (margin included at the target), as the unfused path does,
    and costs nothing: the row maximum and the target logit are the softmax's own.  The backward
    may run once (its buffer is reused in place).  ``workspace``: keeps
    that [N, c] buffer between steps (as :func:`partial_fc.cosine.cosine_logits`'s).
    ``threads``: the row threads of the C passes (on the CPU where :mod:`partial_fc.native` is
    built).  ``handoff``: the same object given to :func:`partial_fc.cosine.cosine_logits`, when
    these cosines feed this softmax alone: they may then hold raw products, and the backward
    leaves its [N, c] step to the cosine's backward pass (:class:`partial_fc.cosine.SoftmaxHandoff`).
    """
    scale = margin.logit_scale()
    if scale is None:
        return None
    if inp.cos.dtype != torch.float32 and inp.cos.dtype != torch.float64:
        raise TypeError(f"cosines must be float32 or float64 for a stable softmax, got {inp.cos.dtype}")
    loss, acc = _ScaledMarginCrossEntropy.apply(inp.cos, inp.feature_norm, inp.target, margin, float(scale),
                                                inp, inp.group, bool(accuracy), workspace, threads, handoff)
    return loss, acc


__all__ = ["margin_cross_entropy"]
