"""The interface between the sharded classifier and a margin.

The classifier (:class:`partial_fc.PartialFC`) computes, for the global batch and the
class rows this rank holds (after Partial FC sampling), the cosine between each feature
and each class row.  A margin turns those cosines into the logits fed to the distributed
softmax.  Everything a margin needs is in :class:`MarginInput`; a margin never talks to
the classifier and only uses ``group`` to reduce running statistics across ranks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..comm import ProcessGroup, all_reduce

# Cosines are clamped this far inside [-1, 1] before acos: d acos / dx is infinite at ±1.
COS_EPS = 1e-7


@dataclass
class MarginInput:
    """What a margin sees for one step.

    ``N`` is the global batch size, ``c`` the number of class columns on this rank.
    """

    cos: torch.Tensor
    """[N, c] float32 cosine of the normalised feature and class row (gradient flows)."""
    target: torch.Tensor
    """[N] int64 column of each sample's class in ``cos``; -1 where another rank holds it."""
    feature_norm: torch.Tensor
    """[N, 1] float32 ‖x‖ of the un-normalised features (gradient flows)."""
    weight_norm: torch.Tensor
    """[c] float32 ‖w‖ of the un-normalised class rows (gradient flows only for margins that
    set ``uses_weight_norm``)."""
    bias: Optional[torch.Tensor] = None
    """[c] float32 class bias, only for margins with ``uses_bias``."""
    group: ProcessGroup = None
    """Process group over which the class dimension is split."""

    @property
    def has_target(self) -> torch.Tensor:
        """[N] bool, True where this rank holds the sample's class."""
        return self.target >= 0

    def target_values(self, values: torch.Tensor) -> torch.Tensor:
        """[N] entries of ``values`` [N, c] at the target column, 0 where not held here."""
        idx = self.target.clamp(min=0).unsqueeze(1)
        return values.gather(1, idx).squeeze(1) * self.has_target.to(values.dtype)

    def global_target_cos(self) -> torch.Tensor:
        """[N] target cosine of every sample, assembled from the ranks that hold them (no grad)."""
        return all_reduce(self.target_values(self.cos.detach()).contiguous(), "sum", self.group)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: hyper-parameter checks of the margins."""
    if not condition:
        raise ValueError(message)


class Margin(nn.Module):
    """Base class: ``forward(MarginInput) -> logits [N, c]`` (float32, scale included).

    Subclasses set the class attributes below when they differ from the default of a
    normalised-feature, normalised-weight margin with a single centre per class.  Their
    constructor arguments are their hyper-parameters, kept as attributes of the same name
    (``describe()`` reads them back).
    """

    name: str = ""
    """Registry name (``partial_fc.margins.MARGINS``)."""
    paper: str = ""
    """Short citation of the paper that defines the margin."""

    uses_bias: bool = False
    """The classifier keeps a per-class bias and passes it in ``MarginInput.bias``."""
    num_centers: int = 1
    """Rows per class (sub-center ArcFace); the classifier takes the max cosine over them."""
    uses_weight_norm: bool = False
    """The logits depend on ‖w‖ (softmax, L-Softmax): ``weight_norm`` then carries a gradient;
    otherwise it is a detached value (saves a pass over the rows in the backward)."""

    def forward(self, inp: MarginInput) -> torch.Tensor:  # pragma: no cover - interface
        """Return the logits for the distributed softmax."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Name and hyper-parameters, for logs and the loss study."""
        params = inspect.signature(type(self).__init__).parameters.values()
        out: dict[str, Any] = {"name": self.name or type(self).__name__}
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(self, p.name):
                out[p.name] = getattr(self, p.name)
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "name")

    @staticmethod
    def target_cos(inp: MarginInput) -> torch.Tensor:
        """[N] cosine at the target column (with gradient), 0 where another rank holds it."""
        return inp.target_values(inp.cos)

    def logit_scale(self) -> Optional[float]:
        """s when the logits are ``s · cos θ_j`` in every column but the target one, whose logit
        is :meth:`target_logit`; None for other margins (the default).

        The classifier then fuses margin and softmax (``partial_fc.margin_softmax``): no
        [N, c] tensor of logits is built by autograd.
        """
        return None

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """[N] target logit from ``target_cos`` [N] (differentiable; only for margins with a
        :meth:`logit_scale`).  Rows whose class another rank holds may get any finite value.

        ``inp.cos`` may hold the cosine GEMM's raw products rather than cosines here (the C
        softmax pass divides them itself, :class:`partial_fc.cosine.SoftmaxHandoff`): read only
        its shape, dtype and device; the target's cosine is ``target_cos``."""
        raise NotImplementedError(f"{type(self).__name__} has no scaled-cosine form")

    def scaled_forward(self, inp: MarginInput) -> torch.Tensor:
        """The logits of a margin with a :meth:`logit_scale`: s·cos with the target column replaced."""
        logits = inp.cos * self.logit_scale()
        return self.apply_target(logits, inp, self.target_logit(self.target_cos(inp), inp), inplace=True)

    def advance(self) -> None:
        """One optimiser step is done (the row optimiser's step calls this once per step).

        State that should follow optimiser steps rather than forwards (an annealing
        schedule, per-step random draws) moves on here, so that gradient accumulation
        does not change it.  Running statistics of the batches (CurricularFace's t,
        AdaFace's norm statistics) are updated by each training forward instead.
        """

    def extra_loss(self, inp: MarginInput) -> Optional[torch.Tensor]:
        """A regulariser added to the loss (MagFace's g(a)); its value over the global batch.

        The classifier turns it into this rank's share (value / world size) for backward.
        """
        return None

    @staticmethod
    def apply_target(logits: torch.Tensor, inp: MarginInput, target_logit: torch.Tensor,
                     inplace: bool = False) -> torch.Tensor:
        """Replace the target column of ``logits`` by ``target_logit`` [N] where held here.

        ``inplace=True`` writes into ``logits`` (for a tensor the margin has just made, whose
        producer does not keep it for backward): it saves an [N, c] copy.
        """
        # Static shapes (no nonzero, no host read): a one-hot mask of the held targets, then
        # a select.  In place, the select is ``logits·(1 − mask) + mask·t`` (exact for finite
        # logits; a non-finite target column then gives NaN, which the step's vote skips).
        idx = inp.target.clamp(min=0).unsqueeze(1)
        has = inp.has_target.unsqueeze(1)
        mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, idx, has)
        put = torch.where(has, target_logit.to(logits.dtype).unsqueeze(1), 0.0)
        if inplace:
            return logits.mul_(~mask).add_(mask * put)
        return torch.where(mask, put, logits)
