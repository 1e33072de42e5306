"""ArcFace: an additive angular margin."""
from __future__ import annotations

import math

import torch

from .base import Margin, MarginInput, require
from .functional import arc_margin


class ArcFace(Margin):
    """Target logit s · cos(θ_y + m), other columns s · cos θ_j.

    Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019 (s = 64, m = 0.5).  Where θ_y + m > π the target continues as
    cos θ_y − m·sin m, as the paper's code does, so that the logit keeps decreasing in θ;
    ``easy_margin`` instead applies the margin only where cos θ_y > 0.
    """

    name = "arcface"
    paper = "Deng et al., ArcFace: Additive Angular Margin Loss for Deep Face Recognition, CVPR 2019"

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False) -> None:
        super().__init__()
        require(s > 0, f"{self.name} s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0.0 <= m < math.pi / 2, f"{self.name} m={m} must be an angle in [0, π/2) radians "
                                        "(0.5 in the paper)")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)

    def logit_scale(self) -> float:
        """s: the other columns are s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m)."""
        return arc_margin(target_cos, self.m, self.easy_margin) * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m) at the target, s·cos elsewhere."""
        return self.scaled_forward(inp)
