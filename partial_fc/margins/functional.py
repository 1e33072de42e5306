"""Angular building blocks shared by several margins (float32, finite at θ = 0 and θ = π)."""
from __future__ import annotations

import math
from typing import Union

import torch

from .base import COS_EPS

Scalar = Union[float, torch.Tensor]


def clamp_cos(cos: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """Cosines clamped to [-1 + eps, 1 - eps], so that acos and √(1 − cos²) have finite slopes."""
    return cos.clamp(-1.0 + eps, 1.0 - eps)


def arc_margin(cos: torch.Tensor, m: Scalar, easy_margin: bool = False) -> torch.Tensor:
    """cos(θ + m) with ArcFace's guard for θ + m > π; ``m`` is a number or a tensor like ``cos``.

    cos(θ + m) stops decreasing once θ + m passes π, so beyond θ = π − m the logit
    continues as cos θ − m·sin m (the original code's linear continuation).  With
    ``easy_margin`` the margin is only applied where cos θ > 0.
    """
    c = clamp_cos(cos)
    sin = torch.sqrt(1.0 - c * c)
    if isinstance(m, torch.Tensor):
        cos_m, sin_m = torch.cos(m), torch.sin(m)
    else:
        cos_m, sin_m = math.cos(m), math.sin(m)
    phi = c * cos_m - sin * sin_m
    if easy_margin:
        return torch.where(c > 0, phi, c)
    # θ < π − m  ⇔  cos θ > cos(π − m) = −cos m
    return torch.where(c > -cos_m, phi, c - m * sin_m)


def cos_multiple(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(mθ) as the Chebyshev polynomial T_m(cos θ): exact, and smooth at θ = 0 and π."""
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


def a_softmax_psi(cos: torch.Tensor, m: int) -> torch.Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m]: monotone continuation of cos(mθ).

    k counts the interval boundaries cos(jπ/m), j = 1..m−1, that lie above cos θ, so no
    acos is needed and the gradient stays finite at θ = 0 and π.
    """
    c = cos.clamp(-1.0, 1.0)
    k = torch.zeros_like(c)
    for j in range(1, m):
        k = k + (c < math.cos(j * math.pi / m)).to(c.dtype)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * cos_multiple(c, m) - 2.0 * k


def annealed_lambda(iteration: torch.Tensor, base: float, gamma: float, power: float,
                    lambda_min: float) -> torch.Tensor:
    """λ = max(λ_min, base · (1 + γ · iteration)^(−power)), the L-Softmax / SphereFace schedule."""
    lam = base * torch.pow(1.0 + gamma * iteration.to(torch.float64), -power)
    return lam.clamp(min=lambda_min).to(torch.float32)
