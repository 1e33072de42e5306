"""Inter-class filtering: negatives that look like the sample's own class leave its softmax.

A noisy dataset (WebFace's automatically cleaned identities) holds the same person under
two class ids.  Pushing a sample away from its twin class hurts the embedding, so a
negative whose cosine with the sample exceeds a threshold is filtered: as in insightface's
``CombinedMarginLoss`` (``interclass_filtering_threshold``, 0.4 in their WebFace12M
conflict recipe), its cosine is replaced by 0 before the margin and carries no gradient.
The column then stands in the softmax as an orthogonal class (logit 0 for the scaled
margins, a term e^0 in the denominator) instead of a close competitor, and the sample's
gradient no longer moves that class row.

The test is elementwise on this rank's columns, so it needs no communication and works
unchanged with sampled columns: each sample's target column (on the one rank that holds
it) is never filtered.
"""
from __future__ import annotations

import torch


def filter_similar_negatives(cos: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """``cos`` [N, c] with every non-target entry above ``threshold`` set to 0 (no gradient there).

    ``target`` [N]: each sample's column here, -1 where another rank holds its class.
    Returns a new tensor (``cos`` may be saved for backward by its producer).
    """
    with torch.no_grad():
        keep = cos <= threshold
        column = target.clamp(min=0).unsqueeze(1)
        # The target column is always kept; where another rank holds the class, column 0
        # keeps its own verdict (the scatter writes back what was there).
        held = (target >= 0).unsqueeze(1)
        keep.scatter_(1, column, keep.gather(1, column) | held)
    return cos * keep


__all__ = ["filter_similar_negatives"]
