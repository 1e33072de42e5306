"""Random in-memory tensors: random images and labels for throughput runs (no files, no decode).

Not to be confused with the synthetic faces of :mod:`data_pipeline.synthetic`, which are
written to shards and read by the file loaders.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .epoch_plan import batches_per_rank, derive_seed, even_split, last_batch_padding
from .loader_base import Batch, Loader

# Distinct images kept in memory; sample i shows image i % POOL_SIZE.
POOL_SIZE = 256


class RandomTensorLoader(Loader):
    """Random images in [-1, 1] and labels in [0, num_classes), drawn by (seed, epoch, rank).

    Exact mode permutes sample indices per epoch and splits them over ranks like the file
    loaders; resampled mode draws indices with replacement. ``workers`` is accepted and
    ignored: batches are gathered from tensors already on ``device``.
    """

    kind = "random_tensors"

    def __init__(self, *, num_samples: int, num_classes: int, image_size: Sequence[int],
                 rank: int, world_size: int, batch_size: int, workers: int, seed: int, mode: str,
                 flip: bool, device: str, epoch_samples: int | None) -> None:
        if num_samples < 1 or num_classes < 1:
            raise ValueError(f"num_samples={num_samples} and num_classes={num_classes} must be "
                             "positive for the random_tensors loader")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size={list(image_size)} must be [height, width], both "
                             "positive")
        if mode == "exact" and num_samples < world_size:
            raise ValueError(f"num_samples={num_samples} is fewer than world_size={world_size}: "
                             "an exact epoch needs at least one sample per rank")
        num_batches = batches_per_rank(mode, num_samples, world_size, batch_size, epoch_samples)
        super().__init__(num_classes=num_classes, num_batches=num_batches, rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode=mode,
                         settings={"num_samples": num_samples, "epoch_samples": epoch_samples})
        self.num_samples, self.flip = num_samples, flip
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(derive_seed(seed, 0x5359))
        h, w = int(image_size[0]), int(image_size[1])
        self.image_size = (h, w)
        pool = torch.rand(min(POOL_SIZE, num_samples), 3, h, w, generator=g) * 2 - 1
        self._pool = pool.to(self.device)
        self._labels = torch.randint(num_classes, (num_samples,), generator=g).to(self.device)

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this rank's last exact-mode batch that repeat its first ones."""
        if self.mode != "exact":
            return 0
        return last_batch_padding(self.num_samples, self.world_size, self.batch_size, self.rank)

    def _indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 0x4958))
        total = len(self) * self.batch_size
        if self.mode == "resampled":
            return torch.randint(self.num_samples, (total,), generator=g)
        # The permutation must agree across ranks, so it is seeded without the rank.
        shared = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm = torch.randperm(self.num_samples, generator=shared)
        lo, hi = even_split(self.num_samples, self.world_size, self.rank)
        mine = perm[lo:hi]
        # Padding repeats the rank's first samples, as in the file loaders.
        return mine[torch.arange(total) % len(mine)]

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        ids = self._indices(epoch).to(self.device)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 0x464C))
        flips = (torch.rand(len(ids), generator=g) < 0.5).to(self.device)
        b = self.batch_size
        for j in range(start, len(self)):
            sel = ids[j * b:(j + 1) * b]
            images = self._pool.index_select(0, sel % len(self._pool))
            if self.flip:
                f = flips[j * b:(j + 1) * b]
                images = torch.where(f[:, None, None, None], images.flip(-1), images)
            yield images, self._labels.index_select(0, sel)


SyntheticLoader = RandomTensorLoader
"""The former name of :class:`RandomTensorLoader` (deprecated)."""
