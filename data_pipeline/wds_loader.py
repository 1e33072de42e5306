"""WebDataset shards through a torch DataLoader: PIL decode in worker processes."""
from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.faults import worker_switch

from .augment import Augment, SampleTransform
from .bad_data import BadSample, SkipLog, log
from .decode import decode_into, default_decoder
from .epoch_plan import batches_per_rank, derive_seed, last_batch_padding, worker_batches
from .loader_base import Batch, Loader, planar_to_model_input
from .sample_streams import exact_stream, resampled_stream
from .tar_reader import RawSample, ShardRef, shard_refs

MAX_WORKER_RESTARTS = 3
"""Loader-worker deaths per epoch recovered inside the rank before the error is raised."""

FLIP_TAG = 0x464C
Transform = Callable[..., np.ndarray]
"""``transform(image, *, epoch, shard, key)``: a decoded uint8 ``[H, W, 3]`` sample, changed or not."""
WORKERS_TAG = 0x574B


class SharedEpoch:
    """The epoch and the first batch to make, set by the training process before each epoch.

    Shared memory, inherited by the loader workers: a worker that lives across epochs reads
    it each time its DataLoader starts it on a new epoch (in ``__iter__``).
    """

    def __init__(self) -> None:
        self._cell = multiprocessing.Array("q", 2)

    def set(self, epoch: int, start: int) -> None:
        with self._cell.get_lock():
            self._cell[0], self._cell[1] = epoch, start

    def get(self) -> tuple[int, int]:
        with self._cell.get_lock():
            return int(self._cell[0]), int(self._cell[1])


class _RankEpoch(IterableDataset):
    """One rank's epochs; in each DataLoader worker it yields that worker's decoded batches
    of the epoch that ``position`` holds when the iteration starts."""

    def __init__(self, shards: list[ShardRef], *, num_classes: int, image_size: tuple[int, int],
                 mode: str, seed: int, position: SharedEpoch, rank: int, world_size: int,
                 batch_size: int, num_batches: int, workers: int, buffer_size: int, flip: bool,
                 strict: bool, transform: Transform | None = None, decoder: str = "pil") -> None:
        super().__init__()
        self.shards, self.num_classes, self.image_size = shards, num_classes, image_size
        self.mode, self.seed, self.position = mode, seed, position
        self.epoch = 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_batches, self.workers = num_batches, workers
        self.buffer_size, self.flip, self.strict = buffer_size, flip, strict
        # The per-sample hook, decode -> transform -> batch slot (None: images as decoded).
        self.transform, self.decoder = transform, decoder
        self._scratch: np.ndarray | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, list[BadSample]]]:
        """Yields ``(uint8 images [B, 3, H, W], labels, batch index, skip events)``."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self.epoch, start = self.position.get()
        batches = worker_batches(self.num_batches, self.workers, worker)
        # Every batch takes exactly batch_size samples of the stream, so the batches consumed
        # before a resume are skipped by count: their shards are not even opened.
        skip = self.batch_size * sum(1 for j in batches if j < start)
        log = SkipLog(self.strict)
        common: dict[str, Any] = dict(num_classes=self.num_classes, seed=self.seed, epoch=self.epoch,
                      rank=self.rank, worker=worker, buffer_size=self.buffer_size, log=log,
                      skip=skip)
        if self.mode == "exact":
            batches, stream = exact_stream(self.shards, world_size=self.world_size,
                                           batch_size=self.batch_size, workers=self.workers,
                                           **common)
        else:
            stream = resampled_stream(self.shards, **common)
        faults = worker_switch(self.rank) if info is not None else None
        for j in batches:
            if j < start:
                continue
            chunk = [next(stream) for _ in range(self.batch_size)]
            if faults:
                faults.in_worker(self.epoch * self.num_batches + j)  # testing: SHARDFACE_FAULT
            images, labels = self._decode(chunk, stream, j, log)
            yield images, labels, j, log.take()

    def _decode(self, chunk: list[RawSample], stream: Iterator[RawSample], j: int,
                log: SkipLog) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.image_size
        if self._scratch is None:
            self._scratch = np.empty((self.batch_size, h, w, 3), dtype=np.uint8)
        decoded = self._scratch  # decoders write HWC; reused from batch to batch
        labels = np.empty(self.batch_size, dtype=np.int64)
        good = 0
        for sample in chunk:
            good += self._add(sample, decoded[good], labels, good, log)
        while not good:
            # A batch made only of undecodable images: read on until one decodes.
            good += self._add(next(stream), decoded[0], labels, 0, log)
        # Slots of undecodable images take repeats of the batch's good ones, so that the
        # batch keeps its size and the samples after it stay where a resume expects them.
        for k in range(good, self.batch_size):
            decoded[k] = decoded[k % good]
            labels[k] = labels[k % good]
        images = torch.empty((self.batch_size, 3, h, w), dtype=torch.uint8)
        if get_worker_info() is not None:
            # Written straight into shared memory: handing the batch to the training
            # process then moves a handle, not another copy of the pixels.
            images.share_memory_()
        out = images.numpy()
        # Planar (CHW) from here: a mirrored row is then a run of single bytes (5x cheaper
        # than mirroring 3-byte pixels), and the float conversion reads contiguous memory.
        np.copyto(out, decoded.transpose(0, 3, 1, 2))
        if self.flip:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch, self.rank, j, FLIP_TAG))
            flips = rng.random(self.batch_size) < 0.5
            out[flips] = out[flips][..., ::-1]
        return images, torch.from_numpy(labels)

    def _add(self, sample: RawSample, slot: np.ndarray, labels: np.ndarray, k: int,
             log: SkipLog) -> int:
        """Decode ``sample`` into ``slot`` (and its label at ``labels[k]``): 1, or 0 if it is bad."""
        bad = decode_into(sample.jpg, slot, self.decoder)
        if bad is not None:
            log.add(BadSample(bad[0], sample.shard, sample.key, bad[1]))
            return 0
        if self.transform is not None:
            augmented = self.transform(slot, epoch=self.epoch, shard=sample.shard, key=sample.key)
            if augmented is not slot:
                slot[...] = augmented
        labels[k] = sample.label
        return 1


class WebDatasetLoader(Loader):
    """WebDataset data shards read by ``workers`` DataLoader processes (0: in this process).

    The worker processes start with the first epoch and live across epochs (the DataLoader's
    ``persistent_workers``): each epoch hands them its number and first batch through a
    :class:`SharedEpoch`. A worker that dies is replaced, with its companions, by fresh ones.
    """

    kind = "webdataset"

    def __init__(self, manifest, *, rank: int, world_size: int, batch_size: int, workers: int,
                 seed: int, mode: str, shuffle_buffer: int, flip: bool, strict: bool,
                 device: str, epoch_samples: int | None, augment: Augment | None = None,
                 decoder: str | None = None) -> None:
        num_batches = batches_per_rank(mode, manifest.num_samples, world_size, batch_size, epoch_samples)
        super().__init__(num_classes=manifest.num_classes, num_batches=num_batches, rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode=mode,
                         settings={"workers": workers, "shuffle_buffer": shuffle_buffer,
                                   "epoch_samples": epoch_samples})
        self.manifest = manifest
        self.shards = shard_refs(manifest)
        self.workers, self.shuffle_buffer = workers, shuffle_buffer
        self.flip, self.strict, self.device = flip, strict, torch.device(device)
        # Each worker's shuffle buffer is read before its samples are handed out (resampled
        # mode refills it from any shard; an exact epoch holds at most this rank's share).
        buffered = max(shuffle_buffer, 1) * max(workers, 1)
        self.read_ahead = buffered if mode == "resampled" else min(buffered, num_batches * batch_size)
        self.augment = augment or Augment()
        self.transform = SampleTransform(self.augment, seed) if self.augment.active else None
        self.decoder = decoder or default_decoder()
        self._position = SharedEpoch()
        self._dataset = _RankEpoch(
            self.shards, num_classes=self.num_classes, image_size=self.manifest.image_size,
            mode=self.mode, seed=self.seed, position=self._position, rank=self.rank,
            world_size=self.world_size, batch_size=self.batch_size, num_batches=num_batches,
            workers=max(1, self.workers), buffer_size=self.shuffle_buffer, flip=self.flip,
            strict=self.strict, transform=self.transform, decoder=self.decoder)
        self._workers_loader: DataLoader | None = None

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this rank's last exact-mode batch that repeat its first ones."""
        if self.mode != "exact":
            return 0
        return last_batch_padding(self.manifest.num_samples, self.world_size, self.batch_size,
                                  self.rank)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the loader workers now running (empty before the first epoch)."""
        it = getattr(self._workers_loader, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self) -> None:
        """Stop the loader workers now (the next epoch starts fresh ones)."""
        loader, self._workers_loader = self._workers_loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            # Now rather than when the iterator is collected: after an error that can be
            # much later, and the workers then take seconds to join.
            it._shutdown_workers()

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        # A worker that dies (killed, out of memory) loses only its prefetched batches: every
        # batch is a function of (epoch, index), so fresh workers continue at the next one.
        deaths = 0
        nxt = start
        while nxt < len(self):
            try:
                for batch in self._iter_workers(epoch, nxt):
                    nxt += 1
                    yield batch
                return
            except WorkerDied as err:
                self.close()
                deaths += 1
                if deaths > MAX_WORKER_RESTARTS:
                    raise RuntimeError(f"{err}; {deaths} loader-worker deaths in epoch {epoch} on rank "
                                       f"{self.rank}: giving up") from err.__cause__
                log.warning("%s; restarting the loader workers at batch %d of epoch %d (rank %d)",
                            err, nxt, epoch, self.rank)

    def _worker_batches(self) -> Iterator[Any]:
        """A new epoch (the one in ``self._position``) from the loader workers."""
        if self._workers_loader is None:
            _no_sigchld_raise()
            # A generator of its own: making the iterator would otherwise draw from the
            # process's torch RNG, which a resumed run (workers started at another point)
            # would leave in another state than a run without a break.  The data order does
            # not use it.
            workers_rng = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, WORKERS_TAG))
            self._workers_loader = DataLoader(self._dataset, batch_size=None, num_workers=self.workers,
                                              pin_memory=self.device.type == "cuda",
                                              persistent_workers=True, generator=workers_rng)
        # Starting the next epoch of persistent workers waits on them: a dead one shows here too.
        return _catch_worker_death(_call_catching_death(iter, self._workers_loader))

    def _iter_workers(self, epoch: int, start: int) -> Iterator[Batch]:
        if start >= len(self):
            return
        cuda = self.device.type == "cuda"
        self._position.set(epoch, start)
        source = iter(self._dataset) if self.workers == 0 else self._worker_batches()
        try:
            # Workers hand batches over in turn; after a resume their next batches need not come
            # in rank order, so hold early ones until their turn.
            waiting: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}
            nxt = start
            for images, labels, j, events in source:
                waiting[j] = (images, labels, events)
                while nxt in waiting:
                    images, labels, events = waiting.pop(nxt)
                    # Counted when handed out: batches lost with a dead worker are made again.
                    self._record(events)
                    nxt += 1
                    # Workers hand over uint8: a float batch is 4x the bytes, and moving it
                    # between processes costs about three times the conversion done here
                    # (on a GPU, after a copy of a quarter of the bytes).
                    images = planar_to_model_input(images.to(self.device, non_blocking=cuda))
                    yield images, labels.to(self.device, non_blocking=cuda)
        except Exception:
            # The workers may be anywhere in the epoch: start the next one with fresh ones.
            self.close()
            raise
        if nxt != len(self) or waiting:
            raise RuntimeError(f"the loader workers produced batches up to {nxt} of {len(self)} "
                               f"and {sorted(waiting)} out of turn (rank {self.rank}, epoch "
                               f"{epoch}); this is a bug in shardface")


class WorkerDied(RuntimeError):
    """A DataLoader worker process ended unexpectedly (the batches it held are lost)."""


def _worker_death(err: BaseException) -> WorkerDied | None:
    """``err`` as :class:`WorkerDied` when it says a DataLoader worker died, else None."""
    if isinstance(err, RuntimeError) and "DataLoader worker" in str(err) and (
            "exited unexpectedly" in str(err) or "killed by signal" in str(err)):
        return WorkerDied(str(err).splitlines()[0])
    if isinstance(err, (ConnectionError, EOFError)):
        # The worker died while handing a batch over: the batch's shared-memory handle died with it.
        return WorkerDied(f"a DataLoader worker died while handing over a batch ({type(err).__name__})")
    return None


def _call_catching_death(fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, ConnectionError, EOFError) as err:
        died = _worker_death(err)
        if died is None:
            raise
        raise died from err


class _catch_worker_death:
    """Iterator over a DataLoader iterator that turns a dead worker into :class:`WorkerDied`."""

    def __init__(self, loader_iter):
        self.loader_iter = loader_iter

    def __iter__(self):
        return self

    def __next__(self):
        return _call_catching_death(next, self.loader_iter)


def _no_sigchld_raise() -> None:
    """Keep torch's SIGCHLD handler out, so that a dead worker is seen inside ``next()``.

    That handler raises in the main thread at whatever line it is on (mid-step, in a
    collective), where the loader cannot recover; without it the DataLoader notices the
    death itself within its status-check interval (~5 s) and raises from ``next()``.
    """
    from torch.utils.data._utils import signal_handling
    signal_handling._SIGCHLD_handler_set = True
