"""Plain softmax with a bias: the un-normalised baseline."""
from __future__ import annotations

import torch

from .base import Margin, MarginInput


class Softmax(Margin):
    """logits = ‖x‖‖w‖cos θ + b = x·w + b: no normalisation, no margin, a per-class bias.

    The softmax cross-entropy every margin below modifies; the classifier keeps the bias
    (``uses_bias``) and differentiates through ‖w‖ (``uses_weight_norm``).
    """

    name = "softmax"
    paper = "softmax cross-entropy with a linear classifier (the baseline of all margin papers)"
    uses_bias = True
    uses_weight_norm = True

    def __init__(self) -> None:
        super().__init__()

    def forward(self, inp: MarginInput) -> torch.Tensor:
        """x·w + b for every column."""
        if inp.bias is None:
            raise ValueError("softmax needs MarginInput.bias (the classifier keeps one when "
                             "margin.uses_bias is True); got None")
        logits = inp.feature_norm * inp.weight_norm.unsqueeze(0) * inp.cos
        return logits + inp.bias.unsqueeze(0)
