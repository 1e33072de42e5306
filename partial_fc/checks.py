"""Checks of the gathered global batch that every rank makes alike (so all raise together)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class NonFiniteEmbeddingError(ValueError):
    """A feature of the global batch is NaN or infinite (every rank raises it together)."""


def owner_rank(i: int, sizes: Sequence[int]) -> int:
    """Rank that contributed global sample ``i``, given every rank's local batch size."""
    end = 0
    for rank, n in enumerate(sizes):
        end += n
        if i < end:
            return rank
    return len(sizes) - 1


def check_global_batch(features: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int],
                       num_classes: Optional[int] = None) -> None:
    """Raise on a label outside [0, num_classes) or a non-finite feature, naming sample and rank.

    Every rank holds the same gathered batch, so every rank reaches the same verdict and
    none is left waiting in a collective.  One host sync per call.
    """
    upper = num_classes if num_classes is not None else torch.iinfo(torch.long).max
    bad_label = (labels < 0) | (labels >= upper)
    finite = torch.isfinite(features).all(dim=1)
    flags = torch.stack([bad_label.any(), ~finite.all()]).cpu()
    if flags[0]:
        i = int(torch.nonzero(bad_label)[0])
        bound = f"[0, {num_classes})" if num_classes is not None else "[0, ∞)"
        raise ValueError(f"label {int(labels[i])} (global sample {i}, rank {owner_rank(i, sizes)}) is outside "
                         f"{bound}: is num_classes right for this data?")
    if flags[1]:
        i = int(torch.nonzero(~finite)[0])
        raise NonFiniteEmbeddingError(f"embedding of global sample {i} (rank {owner_rank(i, sizes)}) is not "
                                      "finite (NaN or inf): the backbone diverged or the input is bad")
