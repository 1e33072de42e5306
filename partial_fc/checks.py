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


CHECK_MODES = ("strict", "deferred", "off")
"""``check_inputs`` of the classifier and the metric losses: strict (raise at once, one host
read per forward), deferred (flags on the device, read with the step's single host read,
see :func:`raise_from_report`) or off."""


def check_mode(value) -> str:
    """The check mode of ``value`` (True → strict, False → off, or one of :data:`CHECK_MODES`)."""
    if value is True:
        return "strict"
    if value is False or value is None:
        return "off"
    if value not in CHECK_MODES:
        raise ValueError(f"check_inputs={value!r} is not one of {', '.join(CHECK_MODES)} (or True/False)")
    return value


def input_report(features: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """[3] int64 on the device, computed without a host read: (first global sample with a label
    outside [0, num_classes), that label, first sample with a non-finite feature); N = none."""
    n = labels.shape[0]
    upper = num_classes if num_classes is not None else torch.iinfo(torch.long).max
    if n == 0:
        return torch.zeros(3, dtype=torch.long, device=labels.device)
    pos = torch.arange(n, device=labels.device)
    none = torch.full((), n, dtype=torch.long, device=labels.device)
    bad_label = (labels < 0) | (labels >= upper)
    first_bad = torch.where(bad_label, pos, none).amin()
    value = labels.long().index_select(0, first_bad.clamp(max=n - 1).view(1)).squeeze(0)
    nonfinite = ~torch.isfinite(features).all(dim=1)
    first_nonfinite = torch.where(nonfinite, pos, none).amin()
    return torch.stack([first_bad, value, first_nonfinite])


def raise_from_report(report: Sequence[int], n: int, sizes: Sequence[int], num_classes: Optional[int],
                      where: str) -> None:
    """Raise the error that :func:`check_global_batch` would have raised, from an :func:`input_report`
    read on the host (``where`` names the step, e.g. "step 12").  A non-finite feature alone is
    not raised: the step's vote skips it as it skips any non-finite loss."""
    first_bad, value, _ = (int(v) for v in report)
    if first_bad < n:
        bound = f"[0, {num_classes})" if num_classes is not None else "[0, ∞)"
        raise ValueError(f"{where}: label {value} (global sample {first_bad}, rank {owner_rank(first_bad, sizes)}) "
                         f"is outside {bound}: is num_classes right for this data?")
