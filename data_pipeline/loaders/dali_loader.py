"""NVIDIA DALI loader: ``fn.readers.webdataset`` over this rank's samples, JPEG decode on GPU or CPU.

Each epoch puts the data shards in the epoch's order (the one the webdataset loader uses)
and gives rank ``r`` the same contiguous piece of the listed samples as that loader, so in
exact mode both give a rank the same samples. The piece is shuffled in windows
(:mod:`data_pipeline.epoch_plan`) and written as index files in that order, one per run of
samples of one shard, into a temporary folder: DALI reads the members an index names in the
index's order. A resume lists only the samples from the resume point on, so the reader
opens no consumed shard and starts mid-shard at the right sample; flips are seeded by the
batch index, so the resumed batches equal the uninterrupted run's.

At scale (many ranks, many shards) the index files are written once per node: local rank 0
builds them, in parallel over shards, while the other ranks wait at ``barrier``; then they
read them.  Whether an image decodes is decided there, before any training collective, and
never by one rank alone in the middle of an epoch: ``verify="decode"`` decodes every image
with PIL while indexing; with ``verify="header"`` (the default, header checks only) a
decode failure that DALI meets later stops this rank at once with a clear error, marking
the indexes so that the restarted run decodes every image while indexing.  A long scan on
one rank while the others wait in a collective would only end in the collective's timeout.

Pipelines and forks: a DALI pipeline that is still up when the process forks (a DataLoader
starting its workers) is copied into the child without the threads it runs on, and if the
child's garbage collector finalises that copy, DALI's finaliser waits for those threads
forever. So every epoch's pipeline is shut down when its iterator ends, fails or is closed
(:func:`release_pipeline`), and once DALI is imported here a fork first collects garbage
in the parent when some pipeline is still up (:func:`_collect_before_fork`), which shuts
down pipelines nobody holds any more, ours or not, where their threads are.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from ..bad_data import BadSample
from ..formats.manifest import atomic_write_bytes
from ..formats.tar_members import split_name
from ..formats.tar_reader import ShardRef, shard_refs
from ..sources.shard_cache import stage_shards
from .augment import Augment, SampleTransform
from .dali_augment import dali_augment, draw_inputs, needed_inputs
from .dali_index import LABEL_WIDTH, ShardIndex, index_location, index_shards
from .epoch_plan import (
    batches_per_rank,
    derive_seed,
    even_split,
    group_spans,
    last_batch_padding,
    shard_order,
    spans_between,
    window_permutation,
)
from .loader_base import Batch, Loader

T = TypeVar("T")
log = logging.getLogger("shardface.data")
VERIFY_MODES = ("header", "decode")
FLIP_TAG, WINDOW_TAG = 0x464C, 0x4457
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
    global _fork_guarded
    if not _fork_guarded:
        os.register_at_fork(before=_collect_before_fork)
        _fork_guarded = True
    return fn, types, Pipeline, DALIGenericIterator


_fork_guarded = False


def _collect_before_fork() -> None:
    """Before a fork: finalise unreachable DALI pipelines here, not in the child (see the module doc).

    DALI keeps a weak reference to every pipeline not yet shut down; with none there is no
    garbage to fear and the fork costs nothing more.
    """
    from nvidia.dali.pipeline import Pipeline
    if getattr(Pipeline, "_pipes", True):
        gc.collect()


def release_pipeline(pipe: Any) -> None:
    """Shut ``pipe`` down now: its threads end and its buffers are freed.

    A pipeline that is shut down has nothing left to wait for, so finalising it later, in
    this process or in a forked child, is harmless. (DALI's own finaliser calls the same
    ``_shutdown``; DALI has no public call for it.)
    """
    shutdown = getattr(pipe, "_shutdown", None)
    if shutdown is not None:
        shutdown()


def dali_device(device: str) -> torch.device:
    """The device a DALI loader hands its batches to: the CPU, or a CUDA device that exists."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here: use "
                         "device='cpu' (DALI then decodes on the CPU)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported by the DALI loader: use "
                         "'cpu' or 'cuda[:N]'")
    return dev


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
                 index_workers: int | None = None, augment: Augment | None = None) -> None:
        _import_dali()
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {', '.join(VERIFY_MODES)}: 'header' checks "
                             "JPEG headers while indexing, 'decode' decodes every image once")
        self.device = dali_device(device)
        num_batches = batches_per_rank(mode, manifest.num_samples, world_size, batch_size, epoch_samples)
        super().__init__(num_classes=manifest.num_classes, num_batches=num_batches, rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode=mode,
                         settings={"shuffle_buffer": shuffle_buffer,
                                   "epoch_samples": epoch_samples})
        self.manifest = manifest
        self.threads = max(1, workers)
        self.shuffle_buffer, self.flip, self.strict = shuffle_buffer, flip, strict
        self.augment = augment or Augment()
        # Without a barrier every rank indexes for itself (one process, or ranks that cannot
        # meet): the writes are atomic, so ranks that race only repeat work.
        self.local_rank = rank if local_rank is None else local_rank
        self.barrier, self.any_rank = barrier, any_rank
        self.index_workers = index_workers
        self.verify = verify
        self._refs, self._stage_events = self._stage(shard_refs(manifest))
        self._indexes = self._build_indexes(decode=self._wants_decode())

    @property
    def last_batch_padding(self) -> int:
        """Trailing samples of this rank's last exact-mode batch that repeat an earlier one."""
        if self.mode != "exact":
            return 0
        return last_batch_padding(self.manifest.num_samples, self.world_size, self.batch_size,
                                  self.rank)

    def _stage(self, refs: list[ShardRef]) -> tuple[list[ShardRef], list[BadSample]]:
        """Remote shards copied into the bounded local cache (DALI reads local files only).

        Local rank 0 of each node downloads while the others wait, then they look the copies up.
        """
        if not any(r.is_remote for r in refs):
            return refs, []
        checksums = [s.sha256 for s in self.manifest.shards]
        staged = self._leader_first(lambda: stage_shards(refs, checksums, self.manifest.remote))
        return staged or stage_shards(refs, checksums, self.manifest.remote, download=False)

    def _leader_first(self, work: Callable[[], T]) -> T | None:
        """``work()`` on local rank 0 of each node while the others wait at the barrier; its
        result there, None on the others.  A failure is raised after the barrier, so that no
        rank is left waiting for it."""
        result: T | None = None
        failure: BaseException | None = None
        if self.barrier is None or self.local_rank == 0:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001 - raised below, after the barrier
                failure = e
        if self.barrier is not None:
            self.barrier()
        if failure is not None:
            raise failure
        return result

    def _marker(self) -> Path:
        """The file that says a decode failure was met: the next start verifies every decode."""
        return index_location(self._refs[0]).with_name(DECODE_MARKER)

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
        indexes = self._leader_first(lambda: index_shards(self._refs, self.num_classes, self.manifest.image_size,
                                                          decode=decode, workers=self.index_workers))
        if indexes is None:
            # Current files are only read; one that no local rank 0 wrote for this file system
            # (e.g. a launcher whose local ranks do not start at 0) is built by this rank.
            indexes = index_shards(self._refs, self.num_classes,
                                   self.manifest.image_size, decode=decode, workers=self.index_workers)
        if decode and self.local_rank == 0 and self._marker().is_file():
            self._marker().unlink(missing_ok=True)
        return indexes

    def _build_indexes(self, decode: bool) -> list[ShardIndex]:
        indexes = self._index_all(decode)
        # A shard that could not be staged is reported by staging (with its URL), not as a missing file.
        failed = {e.shard for e in self._stage_events}
        events: list[BadSample] = self._stage_events + [e for ix in indexes for e in ix.skipped
                                                        if ix.shard.name not in failed]
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

    def _entries(self, epoch: int, start: int) -> list[tuple[int, int]]:
        """``(shard, listed sample)`` of every sample of batches ``start, ..., len-1`` of ``epoch``.

        The rank's samples are its piece of the shards in the epoch's order (counted by the
        index, which leaves bad samples out), in shuffle windows of at least
        ``shuffle_buffer`` samples, each in a permutation of its own. Exact mode repeats the
        last one to fill the last batch; resampled mode goes round the piece again (a new
        permutation each round) until the epoch's batches are full.
        """
        sizes = [ix.num_listed for ix in self._indexes]
        order = shard_order(len(sizes), self.seed, epoch)
        lo, hi = even_split(sum(sizes), self.world_size, self.rank)
        n_rank = hi - lo
        if n_rank == 0:
            raise RuntimeError(f"rank {self.rank} has no samples to read: the indexes list "
                               f"{sum(sizes)} good samples for {self.world_size} ranks")
        spans = spans_between(order, sizes, lo, hi)
        begin, end = start * self.batch_size, len(self) * self.batch_size
        out: list[tuple[int, int]] = []
        last: tuple[int, int] | None = None
        pos = 0
        for round_ in range(1 if self.mode == "exact" else -(-end // n_rank)):
            windows = list(group_spans(spans, self.shuffle_buffer)) if self.shuffle_buffer > 1 \
                else [[span] for span in spans]
            for k, window in enumerate(windows):
                size = sum(span.stop - span.start for span in window)
                final = round_ == 0 and k == len(windows) - 1 and self.mode == "exact"
                if pos + size <= begin and not final:
                    pos += size  # consumed before a resume: never listed, never opened
                    continue
                items = [(span.shard, i) for span in window for i in range(span.start, span.stop)]
                if self.shuffle_buffer > 1:
                    seed = derive_seed(self.seed, epoch, self.rank, round_, k, WINDOW_TAG)
                    items = [items[i] for i in window_permutation(size, seed)]
                last = items[-1]
                out += items[max(0, begin - pos):max(0, end - pos)]
                pos += size
                if pos >= end:
                    return out
        assert last is not None
        # Exact mode: the padding of the last batch repeats the rank's last sample.
        out += [last] * (end - max(pos, begin))
        return out

    def _view_indexes(self, entries: list[tuple[int, int]], folder: Path) -> tuple[list[str], list[str]]:
        """Tar paths and index files that list ``entries`` in their order, one per run of a shard.

        DALI reads the members an index names in the index's order, so the reader starts at
        the resume point and its order is this loader's shuffle.
        """
        lines: dict[int, list[str]] = {}
        paths: list[str] = []
        index_paths: list[str] = []
        k = 0
        while k < len(entries):
            shard = entries[k][0]
            run_end = k
            while run_end < len(entries) and entries[run_end][0] == shard:
                run_end += 1
            if shard not in lines:
                lines[shard] = self._indexes[shard].index_path.read_text().splitlines()[1:]
            view = folder / f"{len(paths):06d}.idx"
            view.write_text(f"v1.2 {run_end - k}\n" + "".join(
                lines[shard][i] + "\n" for _, i in entries[k:run_end]))
            paths.append(str(self._indexes[shard].shard.path))
            index_paths.append(str(view))
            k = run_end
        return paths, index_paths

    def _draws_source(self, epoch: int, entries: list[tuple[int, int]], names: tuple[str, ...]
                      ) -> Callable[[Any], list]:
        """The ``external_source`` callback of the augmentation draws of each batch.

        A sample's draws are the webdataset loader's: keyed by ``(seed, epoch, shard name,
        sample key)``, the key read from the index line that lists the sample.
        """
        lines: dict[int, list[str]] = {}
        keys: list[tuple[str, str]] = []
        for shard, i in entries:
            if shard not in lines:
                lines[shard] = self._indexes[shard].index_path.read_text().splitlines()[1:]
            tokens = lines[shard][i].split()
            name = next(tokens[t + 3] for t in range(0, len(tokens), 4) if tokens[t] == "jpg")
            keys.append((self._indexes[shard].shard.name, str(split_name(name)[0])))
        transform = SampleTransform(self.augment, self.seed)
        h, w = self.manifest.image_size
        b = self.batch_size

        def source(info: Any) -> list:
            lo = info.iteration * b
            draws = [transform.draw_sample(epoch=epoch, shard=shard, key=key, h=h, w=w)
                     for shard, key in keys[lo:lo + b]]
            return draw_inputs(draws, h, w, names)

        return source

    def _pipeline(self, epoch: int, start: int, folder: Path) -> Any:
        fn, types, Pipeline, _ = _import_dali()
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        entries = self._entries(epoch, start)
        paths, index_paths = self._view_indexes(entries, folder)
        seed = derive_seed(self.seed, epoch, self.rank) % (2 ** 31)
        batch_size, rank = self.batch_size, self.rank

        def flips(info: Any) -> list[np.ndarray]:
            # Seeded by the batch index, so a resumed pipeline flips as the uninterrupted one.
            j = start + info.iteration
            coins = np.random.default_rng(derive_seed(self.seed, epoch, rank, j, FLIP_TAG)).random(batch_size)
            return [np.array(c < 0.5, dtype=np.int32) for c in coins]

        pipe = Pipeline(batch_size=batch_size, num_threads=self.threads, device_id=device_id,
                        seed=seed, prefetch_queue_depth=2)
        with pipe:
            jpegs, cls = fn.readers.webdataset(
                paths=paths, index_paths=index_paths,
                ext=["jpg", "cls"], dtypes=[types.UINT8, types.UINT8],
                random_shuffle=False, missing_component_behavior="error", name="reader")
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
            if self.augment.active:
                names = needed_inputs(self.augment)
                draws = fn.external_source(source=self._draws_source(epoch, entries, names),
                                           num_outputs=len(names), batch=True, batch_info=True)
                images = dali_augment(images, self.augment, self.manifest.image_size,
                                      dict(zip(names, draws)), fn, types)
            mirror = fn.external_source(source=flips, batch=True, batch_info=True) if self.flip else 0
            # (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
            pipe.set_outputs(images, cls)
        return pipe

    def _run(self, epoch: int, start: int) -> Iterator[Batch]:
        _, _, _, DALIGenericIterator = _import_dali()
        folder = Path(tempfile.mkdtemp(prefix="shardface-dali-view-"))
        try:
            pipe = self._pipeline(epoch, start, folder)
            if start:
                log.info("DALI loader: resuming epoch %d at batch %d of %d (reading from there)",
                         epoch, start, len(self))
            it = None
            try:
                it = DALIGenericIterator([pipe], ["images", "cls"], size=-1, auto_reset=False)
                for _ in range(start, len(self)):
                    out = next(it)[0]
                    labels = labels_from_digits(out["cls"].cpu()).to(self.device)
                    yield out["images"], labels
            finally:
                del it
                release_pipeline(pipe)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
