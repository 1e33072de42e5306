"""CosFace / AM-Softmax: an additive cosine margin."""
from __future__ import annotations

import torch

from .base import Margin, MarginInput, require


class CosFace(Margin):
    """Target logit s · (cos θ_y − m), other columns s · cos θ_j.

    Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018
    (s = 64, m = 0.35); the same loss as Wang, Cheng, Liu, Liu, "Additive Margin Softmax for
    Face Verification", IEEE SPL 2018.
    """

    name = "cosface"
    paper = "Wang et al., CosFace: Large Margin Cosine Loss for Deep Face Recognition, CVPR 2018"

    def __init__(self, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__()
        require(s > 0, f"cosface s={s} must be positive (the cosine scale, 64 in the paper)")
        require(0.0 <= m < 2.0, f"cosface m={m} must be in [0, 2) (a cosine margin; 0.35 in the paper)")
        self.s, self.m = float(s), float(m)

    def logit_scale(self) -> float:
        """s: the other columns are s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·(cos − m)."""
        return (target_cos - self.m) * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·(cos − m) at the target, s·cos elsewhere."""
        return self.scaled_forward(inp)
