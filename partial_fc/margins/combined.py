"""Combined margin: multiplicative angular, additive angular and additive cosine margins."""
from __future__ import annotations

import torch

from .base import Margin, MarginInput, require
from .functional import clamp_cos


class CombinedMargin(Margin):
    """Target logit s · (cos(m1·θ_y + m2) − m3), other columns s · cos θ_j.

    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
    CVPR 2019, Sec. 3.3 (the combined margin; m1 = 1 gives ArcFace + CosFace).  Defaults
    are insightface's combined configuration: s = 64, m1 = 1.0, m2 = 0.3, m3 = 0.2.  As in
    that code there is no continuation for m1·θ + m2 > π.
    """

    name = "combined"
    paper = "Deng et al., ArcFace (combined margin, Sec. 3.3), CVPR 2019; insightface defaults"

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2) -> None:
        super().__init__()
        require(s > 0, f"combined s={s} must be positive (the cosine scale, 64 by default)")
        require(m1 > 0, f"combined m1={m1} must be positive (multiplicative angular margin, 1.0 by default)")
        require(m2 >= 0, f"combined m2={m2} must be >= 0 (additive angular margin in radians, 0.3 by default)")
        require(m3 >= 0, f"combined m3={m3} must be >= 0 (additive cosine margin, 0.2 by default)")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)

    def logit_scale(self) -> float:
        """s: the other columns are s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·(cos(m1θ + m2) − m3)."""
        theta = torch.acos(clamp_cos(target_cos))
        return (torch.cos(self.m1 * theta + self.m2) - self.m3) * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·(cos(m1θ + m2) − m3) at the target, s·cos elsewhere."""
        return self.scaled_forward(inp)
