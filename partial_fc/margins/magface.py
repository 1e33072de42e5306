"""MagFace: a margin that grows with the feature norm, plus a norm regulariser."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import Margin, MarginInput, require
from .functional import arc_margin


class MagFace(Margin):
    """Target s·cos(θ_y + m(a)), others s·cos θ_j; extra loss λ_g·mean_i g(a_i).

    a = clamp(‖x‖, l_a, u_a), m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a) (linear, increasing),
    g(a) = 1/a + a/u_a² (convex, pushes the norm up for confident samples).  Gradients flow
    into the norm through both m(a) and g(a).  Meng, Zhao, Jiang, Zhang, Qi, "MagFace: A
    Universal Representation for Face Recognition and Quality Assessment", CVPR 2021
    (s = 64, l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 35; ``easy_margin`` on as
    in the paper's code, else ArcFace's continuation beyond θ = π − m(a)).
    """

    name = "magface"
    paper = ("Meng et al., MagFace: A Universal Representation for Face Recognition and Quality "
             "Assessment, CVPR 2021")

    def __init__(self, s: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0, easy_margin: bool = True) -> None:
        super().__init__()
        require(s > 0, f"magface s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0 < l_a < u_a, f"magface norm range l_a={l_a}, u_a={u_a} must satisfy 0 < l_a < u_a "
                               "(10 and 110 in the paper)")
        require(0 <= l_m <= u_m < math.pi / 2, f"magface margin range l_m={l_m}, u_m={u_m} must satisfy "
                                               "0 <= l_m <= u_m < π/2 (0.45 and 0.8 in the paper)")
        require(lambda_g >= 0, f"magface lambda_g={lambda_g} must be >= 0 (35 in the paper)")
        self.s, self.l_a, self.u_a, self.l_m, self.u_m = float(s), float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g, self.easy_margin = float(lambda_g), bool(easy_margin)

    def clamped_norm(self, inp: MarginInput) -> torch.Tensor:
        """[N] a = clamp(‖x‖, l_a, u_a) (with gradient inside the range)."""
        return inp.feature_norm.squeeze(1).clamp(self.l_a, self.u_a)

    def margin_of(self, a: torch.Tensor) -> torch.Tensor:
        """m(a), linear from l_m at l_a to u_m at u_a."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def logit_scale(self) -> float:
        """s: the other columns are s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m(a)); the gradient reaches ‖x‖ through m(a)."""
        m = self.margin_of(self.clamped_norm(inp))
        return arc_margin(target_cos, m, self.easy_margin) * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·cos(θ + m(a)) at the target, s·cos elsewhere."""
        return self.scaled_forward(inp)

    def extra_loss(self, inp: MarginInput) -> Optional[torch.Tensor]:
        """λ_g · mean over the global batch of g(a) = 1/a + a/u_a²."""
        a = self.clamped_norm(inp)
        return self.lambda_g * (1.0 / a + a / (self.u_a ** 2)).mean()
