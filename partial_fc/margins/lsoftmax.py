"""L-Softmax: a multiplicative angular margin on un-normalised features and class rows."""
from __future__ import annotations

import torch

from .annealing import AnnealedAngularMargin
from .base import MarginInput


class LSoftmax(AnnealedAngularMargin):
    """Target logit ‖w_y‖‖x‖ψ(θ_y), other columns ‖w_j‖‖x‖cos θ_j (= w_j·x).

    ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m].  Liu, Wen, Yu, Yang, "Large-Margin
    Softmax Loss for Convolutional Neural Networks", ICML 2016.  The target is blended as
    ‖w_y‖‖x‖(λ cos θ_y + ψ(θ_y)) / (1 + λ) with the paper's schedule (its released MNIST
    setting: m = 4, base = 1000, γ = 2.5e-5, power = 35, λ_min = 0).
    """

    name = "lsoftmax"
    paper = "Liu et al., Large-Margin Softmax Loss for Convolutional Neural Networks, ICML 2016"
    uses_weight_norm = True

    def __init__(self, m: int = 4, base: float = 1000.0, gamma: float = 2.5e-5, power: float = 35.0,
                 lambda_min: float = 0.0) -> None:
        super().__init__(m, base, gamma, power, lambda_min)

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """‖w‖‖x‖cos with the blended ψ at the target."""
        norms = inp.feature_norm * inp.weight_norm.unsqueeze(0)
        logits = norms * inp.cos
        target = self.blended_target(inp) * inp.target_values(norms)
        return self.apply_target(logits, inp, target, inplace=True)
