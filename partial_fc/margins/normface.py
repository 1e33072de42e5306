"""NormFace: softmax on cosines (normalised features and class rows), scaled."""
from __future__ import annotations

import torch

from .base import Margin, MarginInput, require


class NormFace(Margin):
    """logits = s · cos θ for every column (no margin).

    Wang, Xiang, Cheng, Yuille, "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017.  The paper learns s with a scale layer and shows that
    a scale well above 1 is needed for the loss to be able to fall; here s is fixed, 30
    by default as in AM-Softmax by the same first author.
    """

    name = "normface"
    paper = "Wang et al., NormFace: L2 Hypersphere Embedding for Face Verification, ACM MM 2017"

    def __init__(self, s: float = 30.0) -> None:
        super().__init__()
        require(s > 0, f"normface s={s} must be positive (the cosine scale, typically 16-64)")
        self.s = float(s)

    def logit_scale(self) -> float:
        """s: every column is s·cos."""
        return self.s

    def target_logit(self, target_cos: torch.Tensor, inp: MarginInput) -> torch.Tensor:
        """s·cos: no margin."""
        return target_cos * self.s

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """s·cos for every column."""
        return inp.cos * self.s
