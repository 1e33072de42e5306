"""The part every pair loss shares: anchors on this rank, partners in the whole global batch."""
from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import ProcessGroup
from .batch import add_shares, gather_global_batch, pair_masks, without_autocast


class PairLoss(nn.Module, abc.ABC):
    """A loss averaged over the valid anchors of the global batch.

    The anchors are this rank's local samples; their partners are every sample of the
    gathered global batch (self-pairs excluded).  An anchor is valid when it has at least one
    positive (same label) and one negative; the others are left out of the mean and counted:
    after a forward, ``num_valid_anchors`` and ``num_anchors`` hold the global counts (0-dim
    int64 tensors).  No valid anchor gives a loss of 0.  A subclass gives the per-anchor term.
    """

    def __init__(self, group: ProcessGroup, embedding_size: Optional[int], num_classes: Optional[int],
                 check_inputs: bool):
        super().__init__()
        self.group = group
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.check_inputs = check_inputs
        self.num_valid_anchors = torch.zeros((), dtype=torch.long)
        self.num_anchors = torch.zeros((), dtype=torch.long)

    @abc.abstractmethod
    def anchor_terms(self, similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """[n] loss of each local anchor from its [n, N] cosine similarities to the global batch.

        Entries of invalid anchors are discarded by the caller with ``where`` (never
        multiplied), so they may be ±inf; their gradient must not be NaN.
        """

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The loss of the global batch (same value on every rank)."""
        with without_autocast(local_embeddings.device):
            batch = gather_global_batch(local_embeddings, local_labels, self.group, self.embedding_size,
                                        self.num_classes, self.check_inputs, sizes)
            unit = F.normalize(batch.features, dim=1)
            # Anchors are taken from the gathered tensor so that their gradient, too, goes
            # through the gather's backward (and gets the same ×W as every other row).
            similarity = unit[batch.local_rows] @ unit.t()
            positive, negative = pair_masks(batch)
            valid = positive.any(dim=1) & negative.any(dim=1)
            terms = self.anchor_terms(similarity, positive, negative, valid)
            per_anchor = torch.where(valid, terms, torch.zeros_like(terms))
            loss, self.num_valid_anchors = add_shares(per_anchor.sum(), valid.sum(), self.group)
            self.num_anchors = torch.tensor(batch.labels.numel(), dtype=torch.long)
            return loss
