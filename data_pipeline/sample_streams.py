"""The undecoded sample stream of one loader worker, for exact and resampled epochs."""
from __future__ import annotations

import itertools
import random
from typing import Iterable, Iterator, TypeVar

from .bad_data import SkipLog
from .epoch_plan import Span, derive_seed, exact_worker_plan, shard_order, spans_between
from .tar_reader import RawSample, ShardRef, read_span

T = TypeVar("T")

# Tags keep the random streams of different purposes apart under the same (seed, epoch, ...).
SHUFFLE_TAG, RESAMPLE_TAG = 0x5348, 0x5253


def shuffled(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """``items`` shuffled through a buffer of ``buffer_size`` (0 or 1: unchanged order)."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        k = rng.randrange(buffer_size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


def _read_spans(shards: list[ShardRef], spans: list[Span], num_classes: int,
                log: SkipLog) -> Iterator[RawSample]:
    for span in spans:
        yield from read_span(shards[span.shard], span.start, span.stop, num_classes, log)


def _filler(shards: list[ShardRef], order: list[int], start: int, num_classes: int
            ) -> Iterator[RawSample]:
    # Samples read again to make up for bad data: their problems were reported by the
    # worker that owns them, so this log is never looked at.
    sizes = [s.num_samples for s in shards]
    total = sum(sizes)
    while True:
        got = 0
        for sample in _read_spans(shards, spans_between(order, sizes, start, start + total),
                                  num_classes, SkipLog(strict=False)):
            got += 1
            yield sample
        if got == 0:
            raise RuntimeError(f"none of the {len(shards)} data shards has a readable sample "
                               f"(first: {shards[0].path}); check the shard directory")


def exact_stream(shards: list[ShardRef], *, num_classes: int, seed: int, epoch: int, rank: int,
                 world_size: int, batch_size: int, workers: int, worker: int, buffer_size: int,
                 log: SkipLog) -> tuple[list[int], Iterator[RawSample]]:
    """The worker's batch indices and its samples: its shuffled share, padding, then filler."""
    sizes = [s.num_samples for s in shards]
    order = shard_order(len(shards), seed, epoch)
    plan = exact_worker_plan(sizes, order, rank=rank, world_size=world_size,
                             batch_size=batch_size, workers=workers, worker=worker)
    rng = random.Random(derive_seed(seed, epoch, rank, worker, SHUFFLE_TAG))
    stream = itertools.chain(
        shuffled(_read_spans(shards, plan.real, num_classes, log), buffer_size, rng),
        # Padding repeats samples whose problems their owner reports.
        _read_spans(shards, plan.padding, num_classes, SkipLog(strict=False)),
        _filler(shards, order, plan.filler_start, num_classes))
    return plan.batches, stream


def resampled_stream(shards: list[ShardRef], *, num_classes: int, seed: int, epoch: int,
                     rank: int, worker: int, buffer_size: int, log: SkipLog) -> Iterator[RawSample]:
    """An endless stream of whole shards drawn with replacement (by size), shuffled."""
    rng = random.Random(derive_seed(seed, epoch, rank, worker, RESAMPLE_TAG))
    weights = [s.num_samples for s in shards]

    def draws() -> Iterator[RawSample]:
        empty_in_a_row = 0
        while True:
            shard = rng.choices(range(len(shards)), weights=weights)[0]
            got = 0
            for sample in read_span(shards[shard], 0, shards[shard].num_samples, num_classes, log):
                got += 1
                yield sample
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row >= max(16, 2 * len(shards)):
                raise RuntimeError(f"{empty_in_a_row} data shards drawn in a row had no readable "
                                   f"sample (last: {shards[shard].path}); check the shard "
                                   "directory")

    return shuffled(draws(), buffer_size, rng)
