"""AdaFace: a margin that adapts to image quality, read from the feature norm."""
from __future__ import annotations

import math

import torch

from ..comm import all_reduce
from .base import Margin, MarginInput, require


class AdaFace(Margin):
    """Target s·(cos(clip(θ_y − m·ẑ, ε, π − ε)) − (m + m·ẑ)), others s·cos θ_j (cos clipped to ±(1 − ε)).

    ẑ = clip(h·(‖x‖ − μ) / (σ + ε), −1, 1) is the feature norm standardised by running batch
    statistics μ, σ (EMA with weight α of the global batch's mean and unbiased std of the
    norms, norms clipped to [0.001, 100], no gradient).  High-norm (good quality) samples get
    a larger angular and a smaller additive margin, low-norm ones the reverse.
    Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022
    (m = 0.4, h = 0.333, s = 64, α = 0.01, ε = 1e-3, μ₀ = 20, σ₀ = 100).

    The norms of the global batch are on every rank; the statistics are additionally
    reduced with a max over the ranks so that μ and σ stay bit-identical everywhere.
    """

    name = "adaface"
    paper = "Kim et al., AdaFace: Quality Adaptive Margin for Face Recognition, CVPR 2022"

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3) -> None:
        super().__init__()
        require(s > 0, f"adaface s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0.0 <= m < math.pi / 2, f"adaface m={m} must be in [0, π/2) (0.4 in the paper)")
        require(h >= 0, f"adaface h={h} must be >= 0 (concentration of the norm scaler, 0.333 in the paper)")
        require(0.0 < t_alpha <= 1.0, f"adaface t_alpha={t_alpha} must be in (0, 1] (EMA weight of the "
                                      "batch statistics, 0.01 in the paper)")
        require(0.0 < eps < 0.1, f"adaface eps={eps} must be in (0, 0.1) (1e-3 in the paper)")
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), float(eps)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def _update_statistics(self, norms: torch.Tensor, inp: MarginInput) -> None:
        n = norms.numel()
        stats = torch.stack([norms.mean(), norms.std(correction=1) if n > 1 else norms.new_zeros(())])
        all_reduce(stats, "max", inp.group)
        self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * stats[0])
        self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * stats[1])

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """Norm-adaptive angular + additive margin at the target, clipped cosines elsewhere."""
        norms = inp.feature_norm.detach().squeeze(1).clamp(0.001, 100.0)
        if self.training:
            self._update_statistics(norms, inp)
        scaler = ((norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1.0, 1.0)
        cos = inp.cos.clamp(-1.0 + self.eps, 1.0 - self.eps)
        logits = cos * self.s
        theta = torch.acos(inp.target_values(cos))
        theta_m = (theta - self.m * scaler).clamp(self.eps, math.pi - self.eps)
        target = (torch.cos(theta_m) - (self.m + self.m * scaler)) * self.s
        return self.apply_target(logits, inp, target, inplace=True)
