"""NVIDIA DALI loader: ``fn.readers.webdataset`` sharded by rank, JPEG decode on GPU or CPU.

Each epoch builds a pipeline over the data shards in the epoch's order (the one the
webdataset loader uses, so both give a rank the same samples in exact mode). DALI splits the
listed samples into ``world_size`` contiguous parts and this rank reads part ``rank``;
``pad_last_batch`` repeats its last sample to fill the final batch. The pipeline's stream is
cut at ``len(loader)`` batches, equal on all ranks. Resuming mid-epoch runs the pipeline over
the consumed batches again (decoded, then dropped), which costs time, not correctness.

At scale (many ranks, many shards) the index files are written once per node: local rank 0
builds them, in parallel over shards, while the other ranks wait at ``barrier``; then they
read them.  Whether an image decodes is decided there, before any training collective, and
never by one rank alone in the middle of an epoch: ``verify="decode"`` decodes every image
with PIL while indexing; with ``verify="header"`` (the default, header checks only) a
decode failure that DALI meets later stops this rank at once with a clear error, marking
the indexes so that the restarted run decodes every image while indexing.  A long scan on
one rank while the others wait in a collective would only end in the collective's timeout.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .bad_data import BadSample
from .dali_index import LABEL_WIDTH, ShardIndex, index_location, index_shards
from .manifest import atomic_write_bytes
from .epoch_plan import batches_per_rank, derive_seed, last_batch_padding, shard_order
from .loader_base import Batch, Loader
from .tar_reader import shard_refs

log = logging.getLogger("shardface.data")
VERIFY_MODES = ("header", "decode")
DECODE_MARKER = "dali-decode-required"
_DIGIT_WEIGHTS = torch.tensor([10 ** k for k in range(LABEL_WIDTH - 1, -1, -1)], dtype=torch.int64)


def _import_dali() -> tuple[Any, Any, Any, Any]:
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise ImportError(f"the 'dali' loader needs NVIDIA DALI ({e}): install it with "
                          "`pip install nvidia-dali-cuda130` (or `pip install shardface[dali]`), "
                          "or use kind='webdataset'") from None
    return fn, types, Pipeline, DALIGenericIterator


def labels_from_digits(cls: torch.Tensor) -> torch.Tensor:
    """``[B, 10]`` uint8 ASCII digits (the ``.cls`` payloads) → int64 labels ``[B]``."""
    return ((cls.to(torch.int64) - ord("0")) * _DIGIT_WEIGHTS.to(cls.device)).sum(1)


class DaliLoader(Loader):
    """WebDataset data shards read and decoded by a DALI pipeline (``workers`` = DALI threads)."""

    kind = "dali"
    counts_handed_out = False  # indexing reads every sample once (see _build_indexes)

    def __init__(self, manifest, *, rank: int, world_size: int, batch_size: int, workers: int,
                 seed: int, mode: str, shuffle_buffer: int, flip: bool, strict: bool,
                 device: str, epoch_samples: int | None, local_rank: int | None = None,
                 barrier: Callable[[], None] | None = None, any_rank: Callable[[bool], bool] | None = None,
                 verify: str = "header",
                 index_workers: int | None = None) -> None:
        _import_dali()
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {', '.join(VERIFY_MODES)}: 'header' checks "
                             "JPEG headers while indexing, 'decode' decodes every image once")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here: use "
                             "device='cpu' (DALI then decodes on the CPU)")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported by the DALI loader: use "
                             "'cpu' or 'cuda[:N]'")
        num_batches = batches_per_rank(mode, manifest.num_samples, world_size, batch_size, epoch_samples)
        super().__init__(num_classes=manifest.num_classes, num_batches=num_batches, rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode=mode,
                         settings={"shuffle_buffer": shuffle_buffer,
                                   "epoch_samples": epoch_samples})
        self.manifest = manifest
        self.threads = max(1, workers)
        self.shuffle_buffer, self.flip, self.strict = shuffle_buffer, flip, strict
        # Without a barrier every rank indexes for itself (one process, or ranks that cannot
        # meet): the writes are atomic, so ranks that race only repeat work.
        self.local_rank = rank if local_rank is None else local_rank
        self.barrier, self.any_rank = barrier, any_rank
        self.index_workers = index_workers
        self.verify = verify
        self._indexes = self._build_indexes(decode=self._wants_decode())

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this rank's last exact-mode batch that repeat an earlier one."""
        if self.mode != "exact":
            return 0
        return last_batch_padding(self.manifest.num_samples, self.world_size, self.batch_size,
                                  self.rank)

    def _marker(self) -> Path:
        """The file that says a decode failure was met: the next start verifies every decode."""
        return index_location(shard_refs(self.manifest)[0]).with_name(DECODE_MARKER)

    def _wants_decode(self) -> bool:
        """Decode every image while indexing?  Every rank gets the same answer (``any_rank``)."""
        wanted = self.verify == "decode"
        if not wanted and self._marker().is_file():
            log.warning("DALI loader: an earlier run met an image DALI could not decode (%s): every image is "
                        "decoded once while indexing", self._marker())
            wanted = True
        # Nodes without a shared file system may disagree (only one saw the failure); indexes
        # that differ between ranks would split the samples differently, so one vote decides.
        return self.any_rank(wanted) if self.any_rank is not None else wanted

    def _index_all(self, decode: bool) -> list[ShardIndex]:
        """Every shard's index; local rank 0 of each node builds, the others wait, then read."""
        leader = self.barrier is None or self.local_rank == 0
        indexes: list[ShardIndex] | None = None
        failure: BaseException | None = None
        if leader:
            try:
                indexes = index_shards(shard_refs(self.manifest), self.num_classes,
                                       self.manifest.image_size, decode=decode, workers=self.index_workers)
            except Exception as e:  # noqa: BLE001 - raised after the barrier, so no rank waits for it
                failure = e
        if self.barrier is not None:
            self.barrier()
        if failure is not None:
            raise failure
        if indexes is None:
            # Current files are only read; one that no local rank 0 wrote for this file system
            # (e.g. a launcher whose local ranks do not start at 0) is built by this rank.
            indexes = index_shards(shard_refs(self.manifest), self.num_classes,
                                   self.manifest.image_size, decode=decode, workers=self.index_workers)
        if decode and self.local_rank == 0 and self._marker().is_file():
            self._marker().unlink(missing_ok=True)
        return indexes

    def _build_indexes(self, decode: bool) -> list[ShardIndex]:
        indexes = self._index_all(decode)
        events: list[BadSample] = [e for ix in indexes for e in ix.skipped]
        if events and self.strict:
            raise events[0].error()
        # Indexing sees the whole dataset once, so its skips are counted once, not per epoch.
        self._report.reset()
        self._record(events)
        self._report.handed_out = sum(ix.num_listed for ix in indexes)  # read once, here
        if not any(ix.num_listed for ix in indexes):
            raise RuntimeError(f"no readable samples in any of the {len(indexes)} data shards "
                               f"under {self.manifest.root}; check the shard directory")
        return indexes

    def _pipeline(self, epoch: int) -> Any:
        fn, types, Pipeline, _ = _import_dali()
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        order = [self._indexes[i] for i in shard_order(len(self._indexes), self.seed, epoch)]
        order = [ix for ix in order if ix.num_listed > 0]
        seed = derive_seed(self.seed, epoch, self.rank) % (2 ** 31)
        shuffle = self.shuffle_buffer > 1
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                        seed=seed, prefetch_queue_depth=2)
        with pipe:
            jpegs, cls = fn.readers.webdataset(
                paths=[str(ix.shard.path) for ix in order],
                index_paths=[str(ix.index_path) for ix in order],
                ext=["jpg", "cls"], dtypes=[types.UINT8, types.UINT8],
                shard_id=self.rank, num_shards=self.world_size, stick_to_shard=True,
                random_shuffle=shuffle, initial_fill=max(1, self.shuffle_buffer),
                pad_last_batch=self.mode == "exact", missing_component_behavior="error",
                name="reader")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
            mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            # (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
            pipe.set_outputs(images, cls)
        return pipe

    def _run(self, epoch: int, start: int) -> Iterator[Batch]:
        _, _, _, DALIGenericIterator = _import_dali()
        pipe = self._pipeline(epoch)
        if start:
            log.info("DALI loader: resuming epoch %d at batch %d of %d (re-running the batches "
                     "before it)", epoch, start, len(self))
        it = DALIGenericIterator([pipe], ["images", "cls"], size=-1, auto_reset=False)
        try:
            for j in range(len(self)):
                out = next(it)[0]
                if j < start:
                    continue
                labels = labels_from_digits(out["cls"].cpu()).to(self.device)
                yield out["images"], labels
        finally:
            del it, pipe

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        if start >= len(self):
            return
        nxt = start
        try:
            for batch in self._run(epoch, start):
                nxt += 1
                yield batch
        except RuntimeError as e:
            if "Critical error" not in str(e):
                raise
            first = str(e).strip().splitlines()[-1]
            if self._indexes[0].decode_verified:
                raise RuntimeError(f"DALI could not decode an image that PIL decodes (rank {self.rank}, epoch "
                                   f"{epoch}, batch {nxt}: {first}); the data may hold images PIL decodes but "
                                   "DALI does not: try kind='webdataset'") from e
            # Finding the image would mean decoding every image on this rank alone while the
            # others wait in the step's collective.  Stop now instead, and leave a note so the
            # restarted run decides it while indexing, where every rank waits for it anyway.
            try:
                marker = self._marker()
                marker.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(marker, f"rank {self.rank} epoch {epoch} batch {nxt}: {first}\n".encode())
            except OSError:
                pass
            raise RuntimeError(f"DALI could not decode an image on rank {self.rank} (epoch {epoch}, batch {nxt}: "
                               f"{first}); the indexes checked JPEG headers only. Restart the run (it resumes "
                               "from its last checkpoint): indexing then decodes every image once and leaves "
                               "undecodable ones out (data.dali_verify=decode does so from the start)") from e
