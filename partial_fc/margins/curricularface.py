"""CurricularFace: ArcFace target with adaptively re-weighted hard negatives."""
from __future__ import annotations

import math

import torch

from .base import Margin, MarginInput, require
from .functional import arc_margin


class CurricularFace(Margin):
    """Target s·cos(θ_y + m); a negative j with cos θ_j > cos(θ_y + m) becomes s·cos θ_j (t + cos θ_j).

    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020 (s = 64, m = 0.5, α = 0.01).  t is a buffer updated in training,
    before it is used, as t ← α·mean_i cos θ_{y_i} + (1 − α)·t over the GLOBAL batch: the
    target cosines are assembled from the ranks that hold them, so every rank computes the
    same t.  Early on t ≈ 0 and hard negatives are down-weighted (easy samples first); as t
    grows they are emphasised.  The target continues as cos θ − m·sin m beyond θ = π − m, as
    in ArcFace.
    """

    name = "curricularface"
    paper = ("Huang et al., CurricularFace: Adaptive Curriculum Learning Loss for Deep Face "
             "Recognition, CVPR 2020")

    def __init__(self, s: float = 64.0, m: float = 0.5, alpha: float = 0.01) -> None:
        super().__init__()
        require(s > 0, f"curricularface s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0.0 <= m < math.pi / 2, f"curricularface m={m} must be an angle in [0, π/2) (0.5 in the paper)")
        require(0.0 < alpha <= 1.0, f"curricularface alpha={alpha} must be in (0, 1] (EMA weight of the "
                                    "batch statistic, 0.01 in the paper)")
        self.s, self.m, self.alpha = float(s), float(m), float(alpha)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """Modulated hard negatives and the ArcFace target, scaled by s."""
        all_target = inp.global_target_cos()  # [N], every sample, no gradient
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.alpha).add_(self.alpha * all_target.mean())
        # Hard negatives are found against cos(θ_y + m) of every sample, including those
        # whose class lives on another rank.
        threshold = (math.cos(self.m) * all_target
                     - torch.sqrt((1.0 - all_target * all_target).clamp(min=0.0)) * math.sin(self.m))
        cos = inp.cos
        hard = cos > threshold.unsqueeze(1)
        logits = torch.where(hard, cos * (self.t + cos), cos) * self.s
        target = arc_margin(self.target_cos(inp), self.m) * self.s
        return self.apply_target(logits, inp, target, inplace=True)
