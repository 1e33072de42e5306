"""Batch-hard triplet loss (Hermans, Beyer and Leibe, 2017) over the gathered global batch."""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import ProcessGroup
from .pair_loss import PairLoss

# Squared distances are clamped here before the square root, whose slope is infinite at 0.
_DIST_EPS = 1e-12


class TripletLoss(PairLoss):
    """mean_a max(0, margin + max_p ‖u_a − u_p‖ − min_n ‖u_a − u_n‖) on L2-normalised features u.

    The anchors are this rank's local samples; their hardest positive (same label, not the
    anchor itself) and hardest negative (another label) are mined over the global batch.
    The mean runs over the *valid* anchors of the global batch, those with at least one
    positive and one negative; the others are left out and counted: after a forward,
    ``num_valid_anchors`` and ``num_anchors`` hold the global counts (0-dim int64 tensors).
    No valid anchor gives a loss of 0.

    Args:
        margin: hinge margin (distances of unit vectors lie in [0, 2]).
        group: process group the batch is split over.
        embedding_size: expected feature width (checked when given).
        num_classes: labels must lie in [0, num_classes) (checked when given).
        check_inputs: check label range and finiteness (one host sync per forward).
    """

    def __init__(self, margin: float = 0.3, group: ProcessGroup = None, embedding_size: Optional[int] = None,
                 num_classes: Optional[int] = None, check_inputs: bool = True):
        super().__init__(group, embedding_size, num_classes, check_inputs)
        if not (isinstance(margin, (int, float)) and 0.0 <= margin < 2.0):
            raise ValueError(f"margin={margin!r} is outside [0, 2): distances between unit vectors are at "
                             "most 2 (0.3 is usual)")
        self.margin = float(margin)

    def anchor_terms(self, similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """Hinge on the hardest positive and hardest negative distance of each anchor."""
        dist = (2.0 - 2.0 * similarity).clamp_min(_DIST_EPS).sqrt()
        hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
        return (self.margin + hardest_positive - hardest_negative).clamp_min(0.0)

    def extra_repr(self) -> str:
        """The settings shown by print(module)."""
        return f"margin={self.margin}"
