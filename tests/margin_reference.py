"""Float64 reference of every margin, written from the papers' formulas on FULL (unsharded) inputs.

This module is the yardstick for ``partial_fc.margins`` and for the sharded classifier
(``partial_fc.PartialFC``): it never calls margin code, it only reads hyper-parameters and
state from the margin object.

Contract
--------
All functions take ``(name, x, W, labels, margin)``:

- ``name``: a registry name of ``partial_fc.margins.MARGINS`` (``"arcface"``, ...);
- ``x`` [N, D]: the global batch of un-normalised features, any float dtype;
- ``W`` [C, D]: every class row, un-normalised; for ``subcenter_arcface`` [C, K·D] (the K
  sub-centres of class j concatenated in row j, as ``PartialFC.weight`` stores them);
- ``labels`` [N] int64 in [0, C);
- ``margin``: the margin object **as it is just before the forward being checked**.  Its
  ``training`` flag and state (``iteration``, ``t``, ``batch_mean``/``batch_std``,
  ``step``) are read, the paper's one-step state update is applied here when training,
  and the margin is never modified.

Computation is in float64 and differentiable: gradients flow back to ``x``, ``W`` and
``bias`` (pass float64 leaves for a float64 gradient).  Cosines are clamped to
[-1 + COS_EPS, 1 - COS_EPS] wherever the formula takes θ = acos(cos θ), as the margins do.

- ``reference_logits(name, x, W, labels, margin, bias=None) -> [N, C]`` scaled logits
  (``bias`` [C] is used by ``softmax`` only; zeros when omitted);
- ``reference_extra_loss(name, x, W, labels, margin) -> 0-d`` the regulariser over the
  global batch (MagFace's λ_g·mean g(a)); 0 for margins without one;
- ``reference_loss(name, x, W, labels, margin, bias=None) -> 0-d`` mean softmax
  cross-entropy of the reference logits plus the extra loss: the value PartialFC returns;
- ``reference_state_after(name, x, W, labels, margin) -> dict[str, float | int]`` the
  margin's state after that forward (empty for stateless margins).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

COS_EPS = 1e-7


# ---------------------------------------------------------------- shared pieces
def _cosines(x: torch.Tensor, W: torch.Tensor, centers: int = 1) -> torch.Tensor:
    """[N, C] cos θ between features and class rows (max over the sub-centres of a class)."""
    x = x.double()
    rows = W.double().reshape(W.shape[0] * centers, x.shape[1])
    cos = (x / x.norm(dim=1, keepdim=True)) @ (rows / rows.norm(dim=1, keepdim=True)).t()
    if centers > 1:
        cos = cos.reshape(x.shape[0], W.shape[0], centers).max(dim=2).values
    return cos


def _with_target(base: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``base`` with column labels[i] of row i replaced by target[i]."""
    onehot = F.one_hot(labels, base.shape[1]).bool()
    return torch.where(onehot, target.unsqueeze(1), base)


def _theta(cos: torch.Tensor) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS))


def _arcface_target(cos_y: torch.Tensor, m, easy_margin: bool) -> torch.Tensor:
    """cos(θ + m); beyond θ + m > π: cos θ − m·sin m; easy margin: cos θ where cos θ <= 0."""
    theta = _theta(cos_y)
    c = torch.cos(theta)
    m = torch.as_tensor(m, dtype=torch.float64)
    if easy_margin:
        return torch.where(c > 0, torch.cos(theta + m), c)
    return torch.where(theta + m <= math.pi, torch.cos(theta + m), c - m * torch.sin(m))


def _psi(cos_y: torch.Tensor, m: int) -> torch.Tensor:
    """(−1)^k cos(mθ) − 2k, θ ∈ [kπ/m, (k+1)π/m]."""
    theta = torch.acos(cos_y.clamp(-1.0, 1.0))
    k = torch.floor(m * theta / math.pi).clamp(max=m - 1)
    return (-1.0) ** k * torch.cos(m * theta) - 2.0 * k


def _annealed_lambda(margin) -> float:
    it = int(margin.iteration) + (1 if margin.training else 0)
    return max(margin.lambda_min, margin.base * (1.0 + margin.gamma * it) ** (-margin.power))


def _target_of(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return values.gather(1, labels.unsqueeze(1)).squeeze(1)


# ---------------------------------------------------------------- state updates
def _curricular_t(cos: torch.Tensor, labels: torch.Tensor, margin) -> float:
    t = float(margin.t)
    if margin.training:
        t = margin.alpha * float(_target_of(cos, labels).detach().mean()) + (1.0 - margin.alpha) * t
    return t


def _adaface_stats(x: torch.Tensor, margin) -> tuple[float, float]:
    mean, std = float(margin.batch_mean), float(margin.batch_std)
    if margin.training:
        norms = x.detach().double().norm(dim=1).clamp(0.001, 100.0)
        batch_std = float(norms.std(correction=1)) if norms.numel() > 1 else 0.0
        mean = margin.t_alpha * float(norms.mean()) + (1.0 - margin.t_alpha) * mean
        std = margin.t_alpha * batch_std + (1.0 - margin.t_alpha) * std
    return mean, std


def _elastic_margins(cos_y: torch.Tensor, margin) -> torch.Tensor:
    n = cos_y.shape[0]
    if not margin.training:
        return torch.full((n,), margin.m, dtype=torch.float64)
    gen = torch.Generator().manual_seed((margin.seed * 1_000_003 + margin.step) % (2 ** 63))
    draws = margin.m + margin.sigma * torch.randn(n, generator=gen).double()
    if margin.plus:
        # The i-th largest target cosine gets the i-th smallest margin.
        out = torch.empty_like(draws)
        out[torch.argsort(cos_y.detach(), descending=True)] = torch.sort(draws).values
        draws = out
    return draws


# ---------------------------------------------------------------- public functions
def reference_logits(name: str, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, margin,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, C] float64 logits of margin ``name`` (see the module docstring for the contract)."""
    labels = labels.long()
    x64, W64 = x.double(), W.double()
    if name == "softmax":
        b = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.double()
        return x64 @ W64.t() + b
    cos = _cosines(x64, W64, getattr(margin, "num_centers", 1) if name == "subcenter_arcface" else 1)
    cos_y = _target_of(cos, labels)
    if name == "normface":
        return margin.s * cos
    if name == "lsoftmax":
        lam = _annealed_lambda(margin)
        scale = x64.norm(dim=1, keepdim=True) * W64.norm(dim=1).unsqueeze(0)  # ‖x‖‖w‖
        target = _target_of(scale, labels) * (lam * cos_y + _psi(cos_y, margin.m)) / (1.0 + lam)
        return _with_target(scale * cos, labels, target)
    if name == "sphereface":
        lam = _annealed_lambda(margin)
        xn = x64.norm(dim=1)
        target = xn * (lam * cos_y + _psi(cos_y, margin.m)) / (1.0 + lam)
        return _with_target(xn.unsqueeze(1) * cos, labels, target)
    if name == "cosface":
        return margin.s * _with_target(cos, labels, cos_y - margin.m)
    if name in ("arcface", "subcenter_arcface"):
        return margin.s * _with_target(cos, labels, _arcface_target(cos_y, margin.m, margin.easy_margin))
    if name == "combined":
        target = torch.cos(margin.m1 * _theta(cos_y) + margin.m2) - margin.m3
        return margin.s * _with_target(cos, labels, target)
    if name == "curricularface":
        t = _curricular_t(cos, labels, margin)
        # Negatives above cos(θ_y + m) are hard: cos θ_j (t + cos θ_j).
        bound = torch.cos(torch.acos(cos_y.detach().clamp(-1.0, 1.0)) + margin.m)
        hard = cos > bound.unsqueeze(1)
        others = torch.where(hard, cos * (t + cos), cos)
        return margin.s * _with_target(others, labels, _arcface_target(cos_y, margin.m, False))
    if name == "adaface":
        mean, std = _adaface_stats(x64, margin)
        eps = margin.eps
        norms = x64.detach().norm(dim=1).clamp(0.001, 100.0)
        z = (margin.h * (norms - mean) / (std + eps)).clamp(-1.0, 1.0)
        c = cos.clamp(-1.0 + eps, 1.0 - eps)
        theta = torch.acos(_target_of(c, labels))
        target = torch.cos((theta - margin.m * z).clamp(eps, math.pi - eps)) - (margin.m + margin.m * z)
        return margin.s * _with_target(c, labels, target)
    if name == "magface":
        a = x64.norm(dim=1).clamp(margin.l_a, margin.u_a)
        m = margin.l_m + (margin.u_m - margin.l_m) * (a - margin.l_a) / (margin.u_a - margin.l_a)
        return margin.s * _with_target(cos, labels, _arcface_target(cos_y, m, margin.easy_margin))
    if name == "elasticface":
        m = _elastic_margins(cos_y, margin)
        return margin.s * _with_target(cos, labels, torch.cos(_theta(cos_y) + m))
    raise ValueError(f"no reference for margin {name!r}")


def reference_extra_loss(name: str, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                         margin) -> torch.Tensor:
    """The margin's regulariser over the global batch (0-d float64); 0 where there is none."""
    if name == "magface":
        a = x.double().norm(dim=1).clamp(margin.l_a, margin.u_a)
        return margin.lambda_g * (1.0 / a + a / margin.u_a ** 2).mean()
    return torch.zeros((), dtype=torch.float64)


def reference_loss(name: str, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, margin,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean softmax cross-entropy of the reference logits plus the extra loss (0-d float64)."""
    logits = reference_logits(name, x, W, labels, margin, bias)
    return F.cross_entropy(logits, labels.long()) + reference_extra_loss(name, x, W, labels, margin)


def reference_state_after(name: str, x: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                          margin) -> dict:
    """The margin's state after one forward on this batch (its ``training`` flag decides).

    Step counters (λ schedule, ElasticFace draws) move with optimiser steps, not forwards.
    """
    if name in ("lsoftmax", "sphereface"):
        return {"iteration": int(margin.iteration)}
    if name == "elasticface":
        return {"step": margin.step}
    if name == "curricularface":
        return {"t": _curricular_t(_cosines(x, W), labels.long(), margin)}
    if name == "adaface":
        mean, std = _adaface_stats(x, margin)
        return {"batch_mean": mean, "batch_std": std}
    return {}
