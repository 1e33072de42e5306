"""Batch-hard triplet loss (Hermans, Beyer and Leibe, 2017) over the gathered global batch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import ProcessGroup
from .batch import without_autocast, add_shares, gather_global_batch, pair_masks

# Squared distances are clamped here before the square root, whose slope is infinite at 0.
_DIST_EPS = 1e-12


class TripletLoss(nn.Module):
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
        super().__init__()
        if not (isinstance(margin, (int, float)) and 0.0 <= margin < 2.0):
            raise ValueError(f"margin={margin!r} is outside [0, 2): distances between unit vectors are at "
                             "most 2 (0.3 is usual)")
        self.margin = float(margin)
        self.group = group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.check_inputs = check_inputs
        self.num_valid_anchors = torch.zeros((), dtype=torch.long)
        self.num_anchors = torch.zeros((), dtype=torch.long)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Triplet loss of the global batch (same value on every rank)."""
        with without_autocast(local_embeddings.device):
            batch = gather_global_batch(local_embeddings, local_labels, self.group, self.embedding_size,
                                        self.num_classes, self.check_inputs)
            unit = F.normalize(batch.features, dim=1)
            # Anchors are taken from the gathered tensor so that their gradient, too, goes
            # through the gather's backward (and gets the same ×W as every other row).
            anchors = unit[batch.local_rows]
            dist = (2.0 - 2.0 * anchors @ unit.t()).clamp_min(_DIST_EPS).sqrt()
            positive, negative = pair_masks(batch)
            valid = positive.any(dim=1) & negative.any(dim=1)
            hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
            hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
            hinge = (self.margin + hardest_positive - hardest_negative).clamp_min(0.0)
            # where() (not a product) so that the ±inf of invalid anchors never meets the gradient.
            per_anchor = torch.where(valid, hinge, torch.zeros_like(hinge))
            loss, self.num_valid_anchors = add_shares(per_anchor.sum(), valid.sum(), self.group)
            self.num_anchors = torch.tensor(batch.labels.numel(), dtype=torch.long)
            return loss

    def extra_repr(self) -> str:
        """The settings shown by print(module)."""
        return f"margin={self.margin}"
