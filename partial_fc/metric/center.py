"""Center loss (Wen et al., ECCV 2016) with the class centres sharded like the classifier."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..comm import ProcessGroup, rank_and_world
from ..sharding import class_range
from .batch import GlobalBatch, add_shares, gather_global_batch, without_autocast


class CenterLoss(nn.Module):
    """½‖x_i − c_{y_i}‖² averaged over the global batch; centres follow the paper's update rule.

    Each rank holds the centres of its classes ``[class_start, class_start + num_local)``
    (``partial_fc.sharding.class_range``, the same split as ``PartialFC``) in the buffer
    ``centers`` (float32, initialised to zero, saved in ``state_dict``).  The centres are not
    parameters: in training mode, every forward moves them, after the loss of its batch has
    been computed from the centres as they were, by
    ``c_j ← c_j − α·Σ_i δ(y_i=j)(c_j − x_i) / (1 + Σ_i δ(y_i=j))`` over the global batch.

    Args:
        num_classes: total number of classes C over all ranks.
        embedding_size: feature width D.
        alpha: centre learning rate α in (0, 1].
        group: process group the classes and the batch are split over.
        check_inputs: check label range and finiteness (one host sync per forward).
    """

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.5,
                 group: ProcessGroup = None, check_inputs: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
        if not isinstance(embedding_size, int) or embedding_size <= 0:
            raise ValueError(f"embedding_size={embedding_size!r} must be a positive integer")
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha={alpha!r} is outside (0, 1]: it is the fraction of the way each centre "
                             "moves towards its batch features per step (the paper uses 0.5)")
        self.group = group
        self.rank, self.world_size = rank_and_world(group)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.alpha = float(alpha)
        self.check_inputs = check_inputs
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.register_buffer("centers", torch.zeros(self.num_local, embedding_size))
        self._undo: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None

    def record_updates(self) -> None:
        """Remember the old value of every centre row that the next forwards move.

        A training step that is skipped (a non-finite gradient) calls :meth:`rollback_updates`,
        so the centres stay as if the step never ran; one that is applied calls
        :meth:`commit_updates`.  Only the rows of the step's classes are kept, not the shard.
        """
        self._undo = []

    def rollback_updates(self) -> None:
        """Put back the centre rows moved since :meth:`record_updates`."""
        with torch.no_grad():
            for classes, old in reversed(self._undo or []):
                self.centers[classes] = old
        self._undo = None

    def commit_updates(self) -> None:
        """Keep the centre rows moved since :meth:`record_updates`."""
        self._undo = None

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Center loss of the global batch (same value on every rank); updates the centres when training."""
        with without_autocast(local_embeddings.device):
            batch = gather_global_batch(local_embeddings, local_labels, self.group, self.embedding_size,
                                        self.num_classes, self.check_inputs, sizes)
            local_class = batch.labels - self.class_start
            here = (local_class >= 0) & (local_class < self.num_local)
            rows = torch.nonzero(here).squeeze(1)
            # Indexing copies the centre rows, so the in-place update below leaves the graph intact.
            centers = self.centers[local_class[rows]].to(batch.features.dtype)
            diff = batch.features[rows] - centers
            share_sum = 0.5 * diff.pow(2).sum()
            # Every global sample belongs to exactly one rank's classes: the counts add up to N.
            loss, _ = add_shares(share_sum, rows.new_tensor(rows.numel()), self.group)
            if self.training:
                self._update_centers(batch, local_class[rows], rows)
            return loss

    @torch.no_grad()
    def _update_centers(self, batch: GlobalBatch, local_class: torch.Tensor, rows: torch.Tensor) -> None:
        # Only the classes present in the batch move (Δc_j = 0 for the others), so the work is
        # proportional to the batch, not to the shard.
        dtype = batch.features.dtype
        features = batch.features.detach()[rows]
        classes, slot = torch.unique(local_class, return_inverse=True)
        count = torch.zeros(classes.numel(), dtype=dtype, device=features.device)
        count.index_add_(0, slot, torch.ones_like(slot, dtype=dtype))
        feature_sum = features.new_zeros(classes.numel(), self.embedding_size).index_add_(0, slot, features)
        if self._undo is not None:
            self._undo.append((classes, self.centers[classes].clone()))
        centers = self.centers[classes].to(dtype)
        # Σ_i δ(y_i=j)(c_j − x_i) = n_j·c_j − Σ_{i: y_i=j} x_i
        delta = (count[:, None] * centers - feature_sum) / (1.0 + count[:, None])
        self.centers[classes] = (centers - self.alpha * delta).to(self.centers.dtype)

    def extra_repr(self) -> str:
        """The settings shown by print(module)."""
        return (f"classes={self.num_classes}, local=[{self.class_start}, {self.class_start + self.num_local}), "
                f"D={self.embedding_size}, alpha={self.alpha}")
