"""RecordIO decoded by DALI: records read by index in the global epoch order, JPEGs decoded by DALI.

DALI's own RecordIO reader, ``fn.readers.mxnet``, cannot give a global per-epoch permutation:
it sorts the ``.idx`` offsets and reads each shard's contiguous range of the file in file
order (a record's size is the distance to the next listed offset, so a reordered or partial
``.idx`` changes nothing or reads whole neighbouring records), and ``random_shuffle`` only
mixes within an ``initial_fill`` buffer. On an MS1M-layout file it would also hand the header
and identity records to the decoder. So this loader feeds DALI through ``fn.external_source``:
each batch's records (chosen by :class:`~data_pipeline.rec_loader.RecPlan`, the same plan as
the Python reader) are read by offset here and handed over as JPEG bytes together with their
labels, mirror flags and augmentation draws; DALI decodes them (``device="mixed"``: nvJPEG on
the GPU; ``"cpu"`` without one) and normalises. Batches, labels and flips are those of
``loader=rec``; a resumed epoch starts at its next batch without re-reading the ones before.

Augmentations (``data.aug_*``): each slot's :class:`~data_pipeline.augment.Draws` come from
:meth:`RecPlan.transform_rng`, the generator ``loader=rec`` hands its ``SampleTransform``, and
run as the DALI ops of :mod:`data_pipeline.dali_augment`. The order is every loader's: the
augmentations first, then the mirror (in ``fn.crop_mirror_normalize``, as the shard DALI
loader does). So both readers augment the same samples in the same way, up to the rounding of
two implementations (and of two JPEG decoders).

Bad data: damaged records, bad labels and JPEG headers that are unreadable or of the wrong
size are skipped and counted here, before DALI sees them, as the Python reader does. An image
whose header is fine but whose data DALI cannot decode stops the run with an error naming the
batch (``loader=rec`` decodes with PIL and skips such images).

Each epoch's pipeline is shut down when its iterator ends, fails or is closed
(:func:`~data_pipeline.dali_loader.release_pipeline`), not when the garbage collector
gets to it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..bad_data import CORRUPT_JPEG, WRONG_SIZE, BadSample, SkipLog
from ..formats.jpeg import jpeg_size
from ..sources.rec_dataset import RecDataset
from .augment import Augment, SampleTransform
from .dali_augment import dali_augment, draw_inputs, needed_inputs
from .dali_loader import _import_dali, dali_device, release_pipeline
from .loader_base import Batch
from .rec_loader import RecLoaderBase, RecordFile, fill_bad_slots

log = logging.getLogger("shardface.data")


class _Feed:
    """DALI's batch source: batch ``start``, ``start+1``, ... of one epoch, as numpy arrays.

    Each batch is its JPEG bytes, labels, mirror flags and then, if augmentations are on, the
    per-sample inputs ``names`` of :func:`~data_pipeline.dali_augment.draw_inputs`.
    """

    def __init__(self, loader: RecDaliLoader, epoch: int, start: int, names: tuple[str, ...]) -> None:
        self.loader, self.epoch, self.j, self.names = loader, epoch, start, names
        self.events: dict[int, list[BadSample]] = {}
        self._last: tuple[Any, ...] | None = None

    def __call__(self) -> tuple[Any, ...]:
        L = self.loader
        if self.j >= len(L):
            # DALI prefetches past the end of the epoch; those batches are never handed out.
            assert self._last is not None
            return self._last
        req = L.requests.request(self.epoch, self.j)
        slog = SkipLog(L.strict)
        samples = [L.checked(int(i), slog) for i in req.indices]
        if not any(s is not None for s in samples):
            samples[0] = L.read_on(int(req.indices[0]))
        filled = fill_bad_slots(samples, [s is not None for s in samples])
        flips = L.plan.flips(self.epoch, self.j) if L.flip else np.zeros(L.batch_size, dtype=bool)
        draws = []
        if self.names:
            h, w = L.data.image_size
            draws = draw_inputs([L.transform.draw(L.plan.transform_rng(self.epoch, self.j, k), h, w)
                                 for k in range(L.batch_size)], h, w, self.names)
        self.events[self.j] = slog.take()
        self.j += 1
        self._last = ([np.frombuffer(s[0], dtype=np.uint8) for s in filled],
                      np.array([s[1] for s in filled], dtype=np.int64),
                      flips.astype(np.int32), *draws)
        return self._last


class RecDaliLoader(RecLoaderBase):
    """RecordIO records read by index, decoded by DALI (``workers`` = DALI threads)."""

    kind = "dali"

    def __init__(self, data: RecDataset, *, rank: int, world_size: int, batch_size: int,
                 workers: int, seed: int, mode: str, flip: bool, strict: bool, device: str,
                 epoch_samples: int | None, augment: Augment | None = None) -> None:
        _import_dali()
        self.device = dali_device(device)
        super().__init__(data, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                         mode=mode, epoch_samples=epoch_samples, settings={"source": "recordio"})
        self.threads = max(1, workers)
        self.flip, self.strict = flip, strict
        self.file = RecordFile(data)
        self.augment = augment or Augment()
        self.transform = SampleTransform(self.augment, seed)

    def checked(self, i: int, slog: SkipLog) -> tuple[bytes, int] | None:
        """Image ``i``'s JPEG bytes and label if its record, label and JPEG header are usable."""
        got = self.file.read_checked(i, slog)
        if got is None:
            return None
        size = jpeg_size(got[0])
        if size is None or size != tuple(self.data.image_size):
            reason, detail = ((CORRUPT_JPEG, "not a JPEG or an unreadable JPEG header") if size is None else
                              (WRONG_SIZE, f"image is {size[0]}x{size[1]}, the dataset's images are "
                                           f"{self.data.image_size[0]}x{self.data.image_size[1]}"))
            slog.add(BadSample(reason, str(self.data.rec_path), str(int(self.data.keys[i])), detail))
            return None
        return got

    def read_on(self, i: int) -> tuple[bytes, int]:
        """The next usable image after ``i`` in file order (for a batch of bad images only)."""
        n = self.data.num_samples
        for step in range(1, n + 1):
            got = self.checked((i + step) % n, SkipLog(strict=False))
            if got is not None:
                return got
        raise RuntimeError(f"no image of {self.data.rec_path} has a usable record and JPEG header")

    def _pipeline(self, feed: _Feed) -> Any:
        fn, types, Pipeline, _ = _import_dali()
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                        prefetch_queue_depth=2)
        dtypes = [types.UINT8, types.INT64, types.INT32] + [
            types.INT32 if name.endswith("_on") else types.FLOAT for name in feed.names]
        with pipe:
            jpegs, labels, mirror, *draws = fn.external_source(
                source=feed, num_outputs=len(dtypes), batch=True, dtype=dtypes)
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            if feed.names:
                images = dali_augment(images, self.augment, self.data.image_size,
                                      dict(zip(feed.names, draws)), fn, types)
            # Mirrored after the augmentations, as in every loader: a crop box or an erased
            # patch lands where it does in loader=rec and in the shard loaders.
            # (x / 255 - 0.5) / 0.5 == (x - 127.5) / 127.5
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
            pipe.set_outputs(images, labels)
        return pipe

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        if start >= len(self):
            return
        _, _, _, DALIGenericIterator = _import_dali()
        feed = _Feed(self, epoch, start, needed_inputs(self.augment) if self.augment.active else ())
        pipe = self._pipeline(feed)
        j = start
        it = None
        try:
            it = DALIGenericIterator([pipe], ["images", "labels"], size=-1, auto_reset=False)
            while j < len(self):
                try:
                    out = next(it)[0]
                except RuntimeError as e:
                    if "Critical error" not in str(e) and "decod" not in str(e).lower():
                        raise
                    first = str(e).strip().splitlines()[-1]
                    raise RuntimeError(
                        f"DALI could not decode an image of {self.data.rec_path} in batch {j} of "
                        f"epoch {epoch} (rank {self.rank}): {first}; its JPEG header is valid, so "
                        "it was not skipped: use data.loader=rec, which decodes with PIL and skips "
                        "and counts undecodable images") from e
                self._record(feed.events.pop(j, []))
                j += 1
                yield out["images"], out["labels"].to(self.device).to(torch.int64)
        finally:
            del it
            release_pipeline(pipe)
