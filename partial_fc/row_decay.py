"""Weight decay of classifier rows that a step did not sample: two policies.

``sampled`` (the default): a row changes, decay included, only in the steps that sample
it.  Under dense SGD (insightface's Partial FC, whose shard is an ordinary parameter of
``torch.optim.SGD``) an unsampled row still shrinks by ``1 − lr·wd`` every step and keeps
moving by its stale momentum.  The default stays ``sampled`` because a class's row then
changes only when data about that class was seen, checkpoints of earlier runs resume
with the behaviour they were trained with, and at ``sample_rate = 1`` both policies are
the same; the cosine margins do not see a row's norm at all, only its learning rate does
(the gradient of a normalised row scales as 1/‖w‖).

``lazy_dense``: the decay dense SGD would have applied over the steps a row missed is
applied when the row is next sampled, before its cosine is computed:
``w ← w · Π_{missed t} (1 − lr_t·wd)``, the learning-rate schedule included.  This is
exact for SGD without momentum and for the decoupled decay of AdamW's weight term; the
momentum buffer (and Adam's moments) is not carried over missed steps: dense SGD with
momentum would also keep moving an unsampled row by its decaying momentum (up to
``lr·μ/(1−μ)·buf`` in total) and feed the decay into that momentum.  Neither happens
here.

Bookkeeping is one float64 per row (the running log-decay total at the row's last
update) and one host float (the total over all optimiser steps): applying the decay owed
is one gather and one ``exp`` of the sampled rows, with no host read.  Checkpoints store
the decay each row owes (``weight.decay_owed``), which does not depend on the world size
or on the running total, so a shard re-sliced at another world size owes the same.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

ROW_DECAY_POLICIES = ("sampled", "lazy_dense")


class LazyRowDecay:
    """The decay each row of a shard owes since its last update (policy ``lazy_dense``)."""

    def __init__(self, num_rows: int, device: torch.device):
        self.total = 0.0
        """Σ log(1 − lr_t·wd) over the optimiser steps taken (a host float: no device read)."""
        self.mark = torch.zeros(num_rows, dtype=torch.float64, device=device)
        """[rows] ``total`` when each row was last updated."""

    def factors(self, index: Optional[torch.Tensor]) -> torch.Tensor:
        """[n] float32 factor owed by the rows ``index`` (all rows when None); 1 for a row up to date."""
        marks = self.mark if index is None else self.mark.index_select(0, index)
        return (self.total - marks).exp_().float()

    def advance(self, lr: float, weight_decay: float, index: Optional[torch.Tensor]) -> None:
        """One optimiser step updated the rows ``index`` (None: all) with this lr and decay."""
        rate = lr * weight_decay
        if rate >= 1.0:
            raise ValueError(f"lr·weight_decay = {rate:g} >= 1: each step would flip or zero the rows; "
                             "lower the classifier's learning rate or weight decay")
        self.total += math.log1p(-rate)
        if index is None:
            self.mark.fill_(self.total)
        else:
            self.mark.index_fill_(0, index, self.total)

    def owed(self) -> torch.Tensor:
        """[rows] log of the factor each row owes (≤ 0): what a checkpoint stores."""
        return self.total - self.mark

    def load_owed(self, owed: torch.Tensor) -> None:
        """Restore what :meth:`owed` returned (possibly re-sliced for another world size)."""
        if owed.shape != self.mark.shape:
            raise ValueError(f"row decay state has shape {tuple(owed.shape)}, this shard needs "
                             f"{tuple(self.mark.shape)}")
        self.mark.copy_(self.total - owed.to(self.mark))

    def to(self, device: torch.device) -> "LazyRowDecay":
        """Move the marks to ``device`` (the shard moved)."""
        self.mark = self.mark.to(device)
        return self


__all__ = ["LazyRowDecay", "ROW_DECAY_POLICIES"]
