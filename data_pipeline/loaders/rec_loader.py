"""Training straight from insightface RecordIO: a global per-epoch permutation, read by index.

The ``.idx`` gives every image's byte offset, so any record can be read at any time. That
makes the epoch plan simple and exact, unlike a sequential reader (DALI's
``fn.readers.mxnet`` reads its part of the file in file order and shuffles within a buffer,
which is why insightface rewrites the file with ``shuffle_rec.py`` first):

* exact mode: one permutation of all ``N`` images per epoch, the same on every rank
  (seeded by ``(seed, epoch)``). Rank ``r`` owns permuted positions ``[N*r//R, N*(r+1)//R)``;
  its batch ``j`` holds positions ``j*B .. j*B+B-1`` of its part; the last batch is padded
  with repeats of the rank's first samples (``last_batch_padding``), as the shard loaders do.
* resampled mode: batch ``j`` of rank ``r`` draws ``B`` images uniformly with replacement,
  seeded by ``(seed, epoch, rank, j)``.

Every batch is a function of ``(epoch, rank, j)`` alone: a resumed epoch starts reading at
its next batch and reads nothing it consumed before, and any worker can make any batch.
:class:`RecBatchReader` turns a batch's record indices into images in three steps, the
place where per-sample transforms plug in: ``decode`` (JPEG bytes -> uint8 HWC array),
``transform`` (the ``data.aug_*`` augmentations, then the flip: the shard loaders' order) and
``collate`` (arrays -> one uint8 tensor).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..bad_data import BAD_LABEL, CORRUPT_RECORD, BadSample, SkipLog, decode_jpeg
from ..formats.recordio import RecordIOError, read_record, unpack_payload
from ..sources.rec_dataset import RecDataset, label_of
from .epoch_plan import batches_per_rank, derive_seed, even_split, last_batch_padding
from .loader_base import Batch, Loader, to_model_input

PERMUTATION_TAG, RESAMPLE_TAG, FLIP_TAG, WORKERS_TAG, TRANSFORM_TAG = 0x5045, 0x5253, 0x464C, 0x574B, 0x5458

SampleTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""A per-sample augmentation: uint8 ``[H, W, 3]`` image and its own generator -> uint8 image."""


# -- the plan ----------------------------------------------------------------------------------

def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all images, the same on every rank."""
    rng = np.random.default_rng(derive_seed(seed, epoch, PERMUTATION_TAG))
    perm = rng.permutation(num_samples)
    return perm.astype(np.int32) if num_samples < 2 ** 31 else perm


@dataclass(frozen=True)
class RecPlan:
    """Which images each batch of one rank holds (indices into ``RecDataset.keys``)."""

    mode: str
    num_samples: int
    seed: int
    rank: int
    world_size: int
    batch_size: int

    def exact_positions(self, j: int) -> np.ndarray:
        """Positions of the epoch permutation in batch ``j`` (padding wraps to the rank's start)."""
        start, stop = even_split(self.num_samples, self.world_size, self.rank)
        local = j * self.batch_size + np.arange(self.batch_size)
        return start + local % (stop - start)

    def batch(self, epoch: int, j: int, perm: np.ndarray | None) -> np.ndarray:
        """Image indices of batch ``j`` of ``epoch`` (``perm``: the epoch's permutation, exact mode)."""
        if self.mode == "exact":
            assert perm is not None
            return perm[self.exact_positions(j)].astype(np.int64)
        rng = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, j, RESAMPLE_TAG))
        return rng.integers(0, self.num_samples, self.batch_size, dtype=np.int64)

    def flips(self, epoch: int, j: int) -> np.ndarray:
        """Which samples of batch ``j`` are mirrored (the same in the Python and DALI readers)."""
        rng = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, j, FLIP_TAG))
        return rng.random(self.batch_size) < 0.5

    def transform_rng(self, epoch: int, j: int, slot: int) -> np.random.Generator:
        """The generator of the augmentation draws of slot ``slot`` of batch ``j``.

        One key for both readers, so ``loader=rec`` and ``loader=dali`` augment a batch alike.
        """
        return np.random.default_rng(derive_seed(self.seed, epoch, self.rank, j, slot, TRANSFORM_TAG))


# -- reading records ---------------------------------------------------------------------------

class RecordFile:
    """Random access to the images of a :class:`RecDataset`; reopens its file in each process."""

    def __init__(self, data: RecDataset) -> None:
        self.data = data
        self._file: BinaryIO | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        # A handle inherited from another process would share its file position.
        return {"data": self.data, "_file": None, "_pid": -1}

    def where(self, i: int) -> str:
        return f"{self.data.rec_path} (record key {int(self.data.keys[i])})"

    def read(self, i: int) -> tuple[bytes, float]:
        """JPEG bytes and raw label of image ``i``; RecordIOError if the record is damaged."""
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.data.rec_path, "rb")
            self._pid = os.getpid()
        where = self.where(i)
        head, jpeg = unpack_payload(read_record(self._file, int(self.data.offsets[i]), where), where)
        return jpeg, label_of(head.label)

    def read_checked(self, i: int, log: SkipLog) -> tuple[bytes, int] | None:
        """``read`` with the label checked; a damaged record or bad label is logged, None returned."""
        key = str(int(self.data.keys[i]))
        try:
            jpeg, value = self.read(i)
        except RecordIOError as e:
            log.add(BadSample(CORRUPT_RECORD, str(self.data.rec_path), key, str(e)))
            return None
        classes = self.data.num_classes
        if not float(value).is_integer() or value < 0 or (classes is not None and value >= classes):
            log.add(BadSample(BAD_LABEL, str(self.data.rec_path), key,
                              f"label {value} is not a class index in [0, {classes})"))
            return None
        return jpeg, int(value)


def fill_bad_slots(items: list[Any], good: list[bool]) -> list[Any]:
    """Slots of bad samples take repeats of the batch's good ones (in turn), keeping its size."""
    kept = [x for x, ok in zip(items, good) if ok]
    out, k = [], 0
    for x, ok in zip(items, good):
        if ok:
            out.append(x)
        else:
            out.append(kept[k % len(kept)])
            k += 1
    return out


@dataclass(frozen=True)
class BatchRequest:
    """What a worker makes: batch ``j`` of ``epoch`` from images ``indices``."""

    epoch: int
    j: int
    indices: np.ndarray


class RecBatchReader(Dataset):
    """Makes one batch per request: read, ``decode`` -> ``transform`` -> ``collate``.

    ``__getitem__`` returns ``(uint8 images [B, H, W, 3], int64 labels [B], skip events)``.
    """

    def __init__(self, data: RecDataset, plan: RecPlan, *, flip: bool, strict: bool,
                 sample_transform: SampleTransform | None = None) -> None:
        self.file = RecordFile(data)
        self.plan, self.flip, self.strict = plan, flip, strict
        self.image_size = data.image_size
        self.sample_transform = sample_transform

    def decode(self, i: int, log: SkipLog) -> tuple[np.ndarray, int] | None:
        """Image ``i`` as a uint8 ``[H, W, 3]`` array and its label, or None (logged) if bad."""
        got = self.file.read_checked(i, log)
        if got is None:
            return None
        decoded = decode_jpeg(got[0], self.image_size)
        if isinstance(decoded, tuple):
            log.add(BadSample(decoded[0], str(self.file.data.rec_path),
                              str(int(self.file.data.keys[i])), decoded[1]))
            return None
        return decoded, got[1]

    def transform(self, images: list[np.ndarray], epoch: int, j: int) -> list[np.ndarray]:
        """Per-sample augmentation of batch ``j`` (deterministic in seed, epoch, rank, batch, slot).

        ``sample_transform`` first, with a generator of each sample's own
        (:meth:`RecPlan.transform_rng`), then the flip (:meth:`RecPlan.flips`): the order of
        every loader, so a sample's crop box or erased patch lands on the same side of the face
        whether it is read from shards or from a ``.rec``. The DALI reader uses the same
        generators and flags.
        """
        if self.sample_transform is not None:
            images = [self.sample_transform(a, self.plan.transform_rng(epoch, j, k))
                      for k, a in enumerate(images)]
        if self.flip:
            flips = self.plan.flips(epoch, j)
            images = [a[:, ::-1] if f else a for a, f in zip(images, flips)]
        return images

    def collate(self, images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)

    def __getitem__(self, req: BatchRequest) -> tuple[torch.Tensor, torch.Tensor, list[BadSample]]:
        log = SkipLog(self.strict)
        samples = [self.decode(int(i), log) for i in req.indices]
        if not any(s is not None for s in samples):
            samples[0] = self._read_on(int(req.indices[0]))
        good = [s is not None for s in samples]
        filled = fill_bad_slots(samples, good)
        images = self.transform([s[0] for s in filled], req.epoch, req.j)
        images_t, labels_t = self.collate(images, [s[1] for s in filled])
        return images_t, labels_t, log.take()

    def _read_on(self, i: int) -> tuple[np.ndarray, int]:
        # A batch of bad samples only: the next images in file order stand in for one. Their
        # own problems are reported by the batch that holds them, so this log is not kept.
        n = len(self.file.data.keys)
        for step in range(1, n + 1):
            got = self.decode((i + step) % n, SkipLog(strict=False))
            if got is not None:
                return got
        raise RuntimeError(f"no image of {self.file.data.rec_path} could be read and decoded; "
                           "check the file")


class _Requests:
    """The sampler: this epoch's batch requests from ``start`` (read each time it is iterated)."""

    def __init__(self, plan: RecPlan, num_batches: int) -> None:
        self.plan, self.num_batches = plan, num_batches
        self.epoch, self.start = 0, 0
        self._perm: tuple[int, np.ndarray | None] = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray | None:
        if self.plan.mode != "exact":
            return None
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.plan.num_samples, self.plan.seed, epoch))
        return self._perm[1]

    def request(self, epoch: int, j: int) -> BatchRequest:
        return BatchRequest(epoch, j, self.plan.batch(epoch, j, self.permutation(epoch)))

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch = self.epoch
        for j in range(self.start, self.num_batches):
            yield self.request(epoch, j)

    def __len__(self) -> int:
        return self.num_batches - self.start


class RecLoaderBase(Loader):
    """The epoch plan over a :class:`RecDataset`, shared by the Python and DALI readers."""

    def __init__(self, data: RecDataset, *, rank: int, world_size: int, batch_size: int,
                 seed: int, mode: str, epoch_samples: int | None, settings: dict[str, Any]) -> None:
        if data.num_classes is None:
            raise ValueError(f"the class count of {data.rec_path} is unknown: open it with "
                             "scan_labels=True, a property file or num_classes")
        num_batches = batches_per_rank(mode, data.num_samples, world_size, batch_size, epoch_samples)
        super().__init__(num_classes=data.num_classes, num_batches=num_batches, rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode=mode,
                         settings={"epoch_samples": epoch_samples, **data.settings(), **settings})
        self.data = data
        self.plan = RecPlan(mode, data.num_samples, seed, rank, world_size, batch_size)
        self.requests = _Requests(self.plan, num_batches)

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this rank's last exact-mode batch that repeat its first ones."""
        if self.mode != "exact":
            return 0
        return last_batch_padding(self.data.num_samples, self.world_size, self.batch_size, self.rank)


class RecLoader(RecLoaderBase):
    """RecordIO read in pure Python by ``workers`` DataLoader processes (0: in this process).

    The workers live as long as the loader: each request names its epoch and batch.
    """

    kind = "rec"

    def __init__(self, data: RecDataset, *, rank: int, world_size: int, batch_size: int,
                 workers: int, seed: int, mode: str, flip: bool, strict: bool, device: str,
                 epoch_samples: int | None, sample_transform: SampleTransform | None = None) -> None:
        super().__init__(data, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                         mode=mode, epoch_samples=epoch_samples, settings={})
        self.workers, self.device = workers, torch.device(device)
        self.reader = RecBatchReader(data, self.plan, flip=flip, strict=strict,
                                     sample_transform=sample_transform)
        self._loader: DataLoader | None = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[BadSample]]]:
        if self.workers == 0:
            return (self.reader[req] for req in self.requests)
        if self._loader is None:
            # A generator of its own: the process's torch RNG is left alone (a resumed run
            # would otherwise continue with another RNG state than one without a break).
            rng = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, WORKERS_TAG))
            self._loader = DataLoader(self.reader, batch_size=None, sampler=self.requests,
                                      num_workers=self.workers, persistent_workers=True,
                                      pin_memory=self.device.type == "cuda", generator=rng)
        return iter(self._loader)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        if start >= len(self):
            return
        self.requests.epoch, self.requests.start = epoch, start
        cuda = self.device.type == "cuda"
        for images, labels, events in self._batches():
            # Counted when handed out, so a resumed epoch does not count its skips twice.
            self._record(events)
            yield (to_model_input(images.to(self.device, non_blocking=cuda)),
                   labels.to(self.device, non_blocking=cuda))


def build_rec_loader(kind: str, data: Any, *, rank: int, world_size: int, batch_size: int,
                     workers: int, seed: int, mode: str, flip: bool, strict: bool, device: str,
                     epoch_samples: int | None, augment: Any = None) -> Loader:
    """``kind="rec"`` (Python) or ``"dali"`` over a :class:`RecDataset` (see ``build_loader``).

    ``augment`` (an :class:`~data_pipeline.augment.Augment`): the per-sample transforms of
    both readers, drawn alike (:meth:`RecPlan.transform_rng`), before the flip.
    """
    if not isinstance(data, RecDataset):
        raise ValueError(f"loader kind 'rec' reads an insightface train.rec, but the dataset at "
                         f"{getattr(data, 'root', data)} is a shard directory: use "
                         "kind='webdataset' or 'dali' for it")
    if kind not in ("rec", "dali"):
        raise ValueError(f"{data.rec_path} is RecordIO: loader kind {kind!r} reads shard "
                         "directories; use kind='rec' (Python) or 'dali', or convert it with "
                         "`shardface data convert --from recordio`")
    if mode == "exact" and data.num_samples < world_size:
        raise ValueError(f"the dataset has {data.num_samples} samples, fewer than world_size="
                         f"{world_size}: an exact epoch needs at least one sample per rank")
    common: dict[str, Any] = dict(rank=rank, world_size=world_size, batch_size=batch_size, workers=workers,
                                  seed=seed, mode=mode, flip=flip, strict=strict, device=device,
                                  epoch_samples=epoch_samples)
    if kind == "rec":
        from .augment import SampleTransform
        transform = SampleTransform(augment, seed).apply if augment is not None and augment.active else None
        return RecLoader(data, sample_transform=transform, **common)
    from .rec_dali_loader import RecDaliLoader
    return RecDaliLoader(data, augment=augment, **common)
