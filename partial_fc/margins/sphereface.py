"""SphereFace (A-Softmax): a multiplicative angular margin on normalised class rows."""
from __future__ import annotations

import torch

from .annealing import AnnealedAngularMargin
from .base import MarginInput


class SphereFace(AnnealedAngularMargin):
    """Target logit ‖x‖ψ(θ_y), other columns ‖x‖cos θ_j (class rows normalised, features not).

    ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m].  Liu, Wen, Yu, Li, Raj, Song,
    "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017 (m = 4).  The
    target is blended as ‖x‖(λ cos θ_y + ψ(θ_y)) / (1 + λ) with the released schedule
    base = 1000, γ = 0.12, power = 1, λ_min = 5.
    """

    name = "sphereface"
    paper = "Liu et al., SphereFace: Deep Hypersphere Embedding for Face Recognition, CVPR 2017"

    def __init__(self, m: int = 4, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
                 lambda_min: float = 5.0) -> None:
        super().__init__(m, base, gamma, power, lambda_min)

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """‖x‖cos with the blended ψ at the target."""
        logits = inp.feature_norm * inp.cos
        target = self.blended_target(inp) * inp.feature_norm.squeeze(1)
        return self.apply_target(logits, inp, target, inplace=True)
